"""The study: open or resume it in its storage, enqueue the heuristic seeds once, run the optimize loop in this
process and in worker processes (``run_search``, which locks the run folder and writes the results at the end)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import RunLock, UserError, mark_output
from search import faults, storage as storages
from search.results import finish
from search.samplers import make_sampler, param_name
from search.selection import Selection
from search.settings import LEVEL_PARAM, RANGE_LEVELS, SearchSettings
from search.both_workspace import BothWorkspace
from search.drops import drop_scan, scan_applies
from search.space import Space
from search.width_workspace import WidthWorkspace
from search.workspace import Workspace


def open_workspace(settings: SearchSettings, out: Path, device: str = "cpu", batch_size: int = 8,
                   cache_dir: Path | None = None) -> Workspace:
    """The workspace of the settings' search space: per-unit sparsity (``Workspace``), widths (``WidthWorkspace``)
    or both (``BothWorkspace``)."""
    cls = {"width": WidthWorkspace, "both": BothWorkspace}.get(settings.space, Workspace)
    return cls(settings, out, device, batch_size, cache_dir)


def open_study(settings: SearchSettings, out: Path, storage: str | None, study_name: str, space: Space,
               worker: int = 0, heartbeat: int = storages.HEARTBEAT_S,
               storage_obj: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load the study; the default storage is a journal file in the run folder (multi-process safe).

    The sampler's seed mixes the run seed, the worker index and the trials already stored, so a resumed run or
    a second worker never replays the random draws of an earlier one, and every run is reproducible (with a
    shared ``--storage``, independent commands also differ by host and process: ``search.storage``).
    """
    if storage_obj is None:
        storage_obj = storages.open_storage(storages.check_storage(storage), out, heartbeat)
    pruner = optuna.pruners.PercentilePruner(settings.prune_percentile, n_startup_trials=5, n_warmup_steps=0)
    directions = ["minimize", "maximize"] if settings.multi_objective else ["minimize"]
    study = optuna.create_study(study_name=study_name, storage=storage_obj, pruner=pruner, directions=directions,
                                load_if_exists=True)
    done = len(study.get_trials(deepcopy=False))
    step = settings.level_step if settings.realizer == "levels" else 0.02
    seed = storages.sampler_seed(settings.seed, worker, done, shared=storage is not None)
    study.sampler = make_sampler(settings.sampler, space, seed, step)
    return study


def check_run_folder(settings: SearchSettings, out: Path) -> None:
    """Refuse an ``--out`` that holds a different study's configuration; record ours in a new one."""
    path = out / "run_config.json"
    mine = settings.signature()
    if path.exists():
        theirs = read_json(path, "run record")
        if not isinstance(theirs, dict):
            raise UserError(f"{path} is not a prunesearch run record; choose another --out")
        theirs = {**SearchSettings().signature(), **theirs}  # a record from before a setting existed: its default
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise UserError(
                f"--out {out} holds a different study (settings differ in {', '.join(diff)}); "
                f"choose another --out or repeat the original settings to resume"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a prunesearch run folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_json(path, mine)
    mark_output(out, "search")


def enqueue_seeds(study: optuna.Study, ws: Workspace, requeue_running: bool, storage: str | None = None) -> None:
    """Enqueue the heuristic seeds not yet measured (for a budget range, at both ends and the middle, labelled
    ``uniform@0.7`` etc.); with ``requeue_running`` (the run folder's own journal, which no other machine shares)
    also fail and re-queue the trials a killed run left running. Done once per study under a study-wide lock,
    so workers starting together do not each enqueue the seeds; a seed another worker is measuring, or that
    failed with a recorded reason, is not enqueued again."""
    with storages.study_lock(study._storage, storage, ws.out, study.study_name):
        _enqueue_seeds(study, ws, requeue_running)


def _enqueue_seeds(study: optuna.Study, ws: Workspace, requeue_running: bool) -> None:
    for t in study.get_trials(deepcopy=False):
        if requeue_running and t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k == "seed"})
    present = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and faults.FAIL_REASON in t.user_attrs)}
    for level in ((0, RANGE_LEVELS // 2, RANGE_LEVELS) if ws.multi else (None,)):
        target = None if level is None else ws.range_target(level)
        for label, alloc in ws.seeds(target).items():
            params = {param_name(u): float(v) for u, v in zip(ws.space.units, alloc)}
            if level is not None:
                label, params[LEVEL_PARAM] = f"{label}@{target:.4g}", level
            if label not in present:
                study.enqueue_trial(params, user_attrs={"seed": label})


def _finished(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: completed, pruned and failed with a reason (``search.faults``)."""
    return faults.counted(study.get_trials(deepcopy=False))


def optimize(study: optuna.Study, ws: Workspace, trials: int | None, deadline: float | None,
              progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=trials, initial=_finished(study), desc="trials", disable=not progress, dynamic_ncols=True)
    rule = faults.stop_rule(ws, trials, deadline)

    def stop_when_done(study: optuna.Study, trial) -> None:
        rule.record(trial)
        done = _finished(study)
        bar.n = done
        if len(study.directions) > 1:
            bar.set_postfix(front=len(study.best_trials))
        elif study.best_trials:
            bar.set_postfix(best=f"{study.best_value:.5f}")
        bar.refresh()
        if rule.reached(study):
            study.stop()

    if rule.reached(study):
        return
    try:
        study.optimize(ws.objective, callbacks=[stop_when_done], gc_after_trial=False,
                       timeout=None if deadline is None else max(1.0, deadline - time.time()))
    finally:
        bar.close()


def _worker(settings: dict, out: str, storage: str | None, study_name: str, trials: int | None,
            deadline: float | None, device: str, batch_size: int, threads: int, worker: int,
            cache_dir: str | None = None, heartbeat: int = storages.HEARTBEAT_S) -> None:
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = SearchSettings(**settings)
    ws = open_workspace(s, Path(out), device, batch_size, cache_dir)
    study = open_study(s, Path(out), storage, study_name, ws.space, worker, heartbeat)
    optimize(study, ws, trials, deadline, progress=False)


def run_search(settings: SearchSettings, out: Path, trials: int | None = None, time_budget: float | None = None,
               workers: int = 1, storage: str | None = None, study_name: str = "prunesearch",
               device: str = "cpu", batch_size: int = 8, report_ppl: tuple[str, ...] = ("wikitext2",),
               report_limit: int | None = None, progress: bool = True,
               guide: Callable[..., None] | None = None, cache_dir: Path | None = None,
               heartbeat: int = storages.HEARTBEAT_S, selection: Selection | None = None) -> dict:
    """Run (or resume) a search; writes trials.parquet, best_config.json (for a budget range: the Pareto front,
    pareto.csv and pareto/*.json) and report.json into ``out``.

    ``selection``: how many of the best allocations are pruned for real and re-measured on fresh windows to pick
    the answer (``search.selection``; None or ``top=0``: the best search fitness).

    ``guide`` replaces the plain optimize loop of this process (same arguments as ``optimize``), e.g. the
    predictor-guided loop of ``search.guided.Guide``; extra workers still run the plain sampler.

    Refused settings leave ``out`` as it was (a folder created here is removed); the folder is locked for the
    run's life, so a second command on a live ``out`` is refused. The summary's ``stopped`` is the one-line
    cause when a run of failed trials stopped the search."""
    if trials is None and time_budget is None:
        trials = 100
    if workers < 1:
        raise UserError("--workers must be at least 1")
    settings.validate()
    if selection is not None:
        selection.validate()
    if guide is not None and settings.multi_objective:
        raise UserError("the accuracy predictor guides single-budget runs; a budget range needs --predictor off")
    storages.check_storage(storage)
    created, fresh = not out.exists(), not (out / "run_config.json").exists()
    check_run_folder(settings, out)
    try:
        lock = RunLock(out).acquire()
    except Exception:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    handler = logging.FileHandler(out / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("prunesearch", "optuna"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("prunesearch").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        try:
            storage_obj = storages.open_storage(storage, out, heartbeat)  # an unreachable database: before the model
            ws = open_workspace(settings, out, device, batch_size, cache_dir)
            study = open_study(settings, out, storage, study_name, ws.space, heartbeat=heartbeat,
                               storage_obj=storage_obj)
        except Exception:
            if fresh:  # refused: leave no folder behind (or one as empty as it was), for a corrected command
                lock.release()
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                else:
                    for child in out.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
        # the lock is ours, so RUNNING trials in the run folder's own journal were left by a dead run
        enqueue_seeds(study, ws, requeue_running=storage is None, storage=storage)
        rule = faults.stop_rule(ws, trials, time.time() + time_budget if time_budget else None)
        deadline = rule.deadline
        if scan_applies(settings, ws.space):  # before other workers start: they would take the queued scan
            drop_scan(study, ws, rule, storage, progress, settings.drop_run)
        procs = []
        interrupted = False
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            torch.set_num_threads(threads)
            ctx = mp.get_context("spawn")
            for worker in range(1, workers):
                p = ctx.Process(target=_worker, args=(dataclasses.asdict(settings), str(out), storage, study_name,
                                                      trials, deadline, device, batch_size, threads, worker,
                                                      None if cache_dir is None else str(cache_dir), heartbeat))
                p.start()
                procs.append(p)
        try:
            (guide or optimize)(study, ws, trials, deadline, progress)
        except KeyboardInterrupt:
            interrupted = True
            for p in procs:
                p.terminate()
        for p in procs:
            p.join()
        summary = finish(study, ws, out, report_ppl if not (interrupted or rule.failure) else (), report_limit,
                         interrupted, None if rule.failure else selection)
        if rule.failure:
            summary["stopped"] = rule.failure
        return summary
    finally:
        for name in ("prunesearch", "optuna"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        lock.release()
