"""The allocation search: an Optuna study whose trials are per-layer allocations meeting the budget exactly.

One process (or each of ``workers`` processes) holds a ``Workspace``: the model, the weight ranks of the
score-based pruner and the dense reference log-probabilities, all computed once and cached under the run
folder. A trial samples one sparsity per unit, projects it onto the budget, writes the masked weights and
measures KL to the dense model on held-out tokens: first on a few sequences (Optuna's pruner stops the poor
ones), then on all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from pruners.registry import layout
from search.samplers import make_sampler, param_name
from search.levels import LevelDatabase, LevelRealizer
from search.scores import Realizer, ScoreCache
from search.seeds import heuristic_seeds
from search.space import Space, make_space, parse_budget

log = logging.getLogger("prunesearch.search")


@dataclass
class SearchSettings:
    """Everything that defines a study; two runs with equal settings are the same study."""

    model: str | None = None
    budget: str = "sparsity=0.7"
    pattern: str = "unstructured"
    granularity: str = "block"
    pruner: str = "wanda"
    fitness: str = "kl"
    sampler: str = "tpe"
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    fitness_samples: int = 32
    low_fidelity_samples: int = 8
    prune_percentile: float = 50.0
    data_dir: str | None = None
    level_step: float = 0.025

    def signature(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, *fields: str) -> str:
        """A short hash of some settings, naming the cache files that depend on exactly those."""
        sig = self.signature()
        return hashlib.sha256(json.dumps({f: sig[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


class Workspace:
    """What one search process needs in memory: model, space, ranks, reference, and the fitness."""

    def __init__(self, settings: SearchSettings, out: Path, device: str = "cpu", batch_size: int = 8):
        from prunesearch import data
        from prunesearch.evaluate import DenseReference
        from prunesearch.models import default_seqlen, load_model
        from pruners.masks import parse_pattern

        self.settings, self.out, self.batch_size = settings, out, batch_size
        self.model, self.tokenizer, self.source = load_model(settings.model, device)
        self.lay = layout(self.model)
        self.seqlen = default_seqlen(self.model, settings.seqlen, builtin=settings.model is None)
        total = sum(p.numel() for p in self.model.parameters())
        self.budget_kind, self.budget_value, target = parse_budget(settings.budget, self.lay, total)
        low = settings.min_sparsity if settings.min_sparsity is not None else max(0.0, target - 0.2)
        high = settings.max_sparsity if settings.max_sparsity is not None else min(0.99, target + 0.2)
        self.space = make_space(self.lay, target, low, high, settings.granularity)
        self.m = parse_pattern(settings.pattern)
        if settings.pruner not in ("wanda", "magnitude", "gblm", "sparsegpt"):
            raise ValueError(f"search pruner must be wanda, magnitude, gblm or sparsegpt, got {settings.pruner!r}")
        if not 0 < settings.level_step < 1:
            raise ValueError(f"level step must be in (0, 1), got {settings.level_step}")
        if settings.fitness not in ("kl", "ppl"):
            raise ValueError(f"fitness must be kl or ppl, got {settings.fitness!r}")
        if not 0 < settings.low_fidelity_samples <= settings.fitness_samples:
            raise ValueError("need 0 < low-fidelity samples <= fitness samples")
        cache = out / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        self.calib_protocol = data.describe(settings.calib, settings.data_dir)
        self.heldout_protocol = data.describe("c4", settings.data_dir)

        if settings.pruner == "sparsegpt":
            self.scores = self._level_database(cache, device, batch_size)
            self.realizer = LevelRealizer(self.lay, self.scores)
        else:
            key = settings.key("model", "pruner", "pattern", "calib", "nsamples", "seqlen", "seed", "data_dir")
            path = cache / f"scores-{key}.safetensors"
            if path.exists():
                self.scores = ScoreCache.load(path)
            else:
                t = time.perf_counter()
                self.scores = ScoreCache.build(self.model, self.lay, settings.pruner, self.m,
                                               self.calibration_ids(), device, batch_size)
                self.scores.save(path)
                log.info("ranked all weights in %.1fs", time.perf_counter() - t)
            self.realizer = Realizer(self.lay, self.scores)

        self.heldout = data.heldout_ids(self.tokenizer, settings.fitness_samples, self.seqlen, settings.seed,
                                        settings.data_dir)
        ref_key = settings.key("model", "fitness_samples", "seqlen", "seed", "data_dir")
        ref_path = cache / f"reference-{ref_key}.safetensors"
        if settings.fitness == "kl":
            if ref_path.exists():
                self.reference = DenseReference.load(ref_path)
            else:
                self.reference = DenseReference.compute(self.model, self.heldout, batch_size)
                self.reference.save(ref_path)

    def calibration_ids(self) -> torch.Tensor:
        """The calibration sequences the pruner's statistics come from (also used to realize the report)."""
        from prunesearch import data

        s = self.settings
        return data.calibration_ids(self.tokenizer, s.calib, s.nsamples, self.seqlen, s.seed, s.data_dir)

    def _level_database(self, cache: Path, device: str, batch_size: int) -> LevelDatabase:
        """Load or build the SparseGPT level database of this space (levels on the grid ``allocation`` snaps to)."""
        s = self.settings
        key = s.key("model", "pattern", "calib", "nsamples", "seqlen", "seed", "data_dir", "budget", "granularity",
                    "min_sparsity", "max_sparsity", "level_step")
        folder = cache / f"levels-{key}"
        if folder.exists():
            return LevelDatabase(folder)
        if self.m:
            grid = [k / self.m for k in range(self.m) if self.space.low - 1e-9 <= k / self.m <= self.space.high + 1e-9]
            unit_levels = [grid] * self.space.dim
        else:
            unit_levels = [lv.tolist() for lv in self.space.levels(s.level_step)]
        levels = {name: lv for unit, lv in zip(self.space.members, unit_levels) for name in unit}
        t = time.perf_counter()
        db = LevelDatabase.build(self.model, self.lay, levels, self.m, self.calibration_ids(), folder, device,
                                 batch_size)
        log.info("built the SparseGPT level database (%d levels per unit at most) in %.1fs",
                 max(map(len, unit_levels)), time.perf_counter() - t)
        return db

    def allocation(self, x: np.ndarray) -> np.ndarray:
        """The effective allocation of sampled values: on the budget, inside the bounds, on the N:M grid (or, for
        the SparseGPT database, on its level grid)."""
        alloc = self.space.project(x)
        if self.m:
            return self.space.snap(alloc, self.m)
        if self.settings.pruner == "sparsegpt":
            return self.space.snap_levels(alloc, self.settings.level_step)
        return alloc

    def realize(self, alloc: np.ndarray) -> None:
        self.realizer.apply(self.space.to_targets(alloc))

    def _fitness_sum(self, start: int, stop: int) -> tuple[float, int]:
        if self.settings.fitness == "kl":
            return self.reference.kl_sum(self.model, start, stop, self.batch_size)
        from prunesearch.evaluate import window_nll

        nll = window_nll(self.model, self.heldout[start:stop], self.batch_size)
        return float(nll.sum()) * (self.seqlen - 1), nll.numel() * (self.seqlen - 1)

    def _value(self, total: float, count: int) -> float:
        mean = total / count
        return mean if self.settings.fitness == "kl" else math.exp(mean)

    def measure(self, alloc: np.ndarray, trial: optuna.Trial | None = None) -> dict:
        """Realize and score an allocation at both fidelities; a ``trial`` may be pruned after the first."""
        self.realize(alloc)
        n_low = self.settings.low_fidelity_samples
        low_sum, low_count = self._fitness_sum(0, n_low)
        low = self._value(low_sum, low_count)
        if trial is not None:
            trial.report(low, step=0)
            if trial.should_prune():
                raise optuna.TrialPruned
        rest_sum, rest_count = self._fitness_sum(n_low, self.heldout.shape[0])
        return {"fitness_low": low, "fitness": self._value(low_sum + rest_sum, low_count + rest_count)}

    def objective(self, trial: optuna.Trial) -> float:
        t = time.perf_counter()
        x = np.array([trial.suggest_float(param_name(u), self.space.low, self.space.high) for u in self.space.units])
        alloc = self.allocation(x)
        trial.set_user_attr("allocation", alloc.tolist())
        trial.set_user_attr("budget_sparsity", self.space.mean(alloc))
        full = "seed" in trial.user_attrs or "guide" in trial.user_attrs  # seeds and predictor-chosen trials
        try:
            result = self.measure(alloc, None if full else trial)
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - t)
        trial.set_user_attr("fitness_low", result["fitness_low"])
        return result["fitness"]


def open_study(settings: SearchSettings, out: Path, storage: str | None, study_name: str, space: Space,
               worker: int = 0) -> optuna.Study:
    """Create or load the study; the default storage is a journal file in the run folder (multi-process safe).

    The sampler's seed mixes the run seed, the worker index and the trials already stored, so a resumed run or
    a second worker never replays the random draws of an earlier one, and every run is reproducible.
    """
    if storage is None:
        backend = optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
        storage_obj: optuna.storages.BaseStorage | str = optuna.storages.JournalStorage(backend)
    elif storage.startswith(("sqlite:", "postgresql", "mysql")):
        storage_obj = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
    else:
        backend = optuna.storages.journal.JournalFileBackend(storage)
        storage_obj = optuna.storages.JournalStorage(backend)
    pruner = optuna.pruners.PercentilePruner(settings.prune_percentile, n_startup_trials=5, n_warmup_steps=0)
    study = optuna.create_study(study_name=study_name, storage=storage_obj, pruner=pruner, direction="minimize",
                                load_if_exists=True)
    done = len(study.get_trials(deepcopy=False))
    step = settings.level_step if settings.pruner == "sparsegpt" else 0.02
    study.sampler = make_sampler(settings.sampler, space, settings.seed + 7919 * worker + 104729 * done, step)
    return study


def check_run_folder(settings: SearchSettings, out: Path) -> None:
    """Refuse an ``--out`` that holds a different study's configuration; record ours in a new one."""
    path = out / "run_config.json"
    mine = settings.signature()
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(
                f"--out {out} holds a different study (settings differ in {', '.join(diff)}); "
                f"choose another --out or repeat the original settings to resume"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not a prunesearch run folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2))


def enqueue_seeds(study: optuna.Study, ws: Workspace, requeue_running: bool) -> None:
    """Enqueue the heuristic seeds not yet measured; with ``requeue_running`` (the run folder's own journal, which
    no other machine shares) also fail and re-queue the trials a killed run left running."""
    seeds = heuristic_seeds(ws.space, ws.scores.outlier_ratio)
    for t in study.get_trials(deepcopy=False):
        if requeue_running and t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k == "seed"})
    present = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.WAITING)}
    for label, alloc in seeds.items():
        if label not in present:
            params = {param_name(u): float(v) for u, v in zip(ws.space.units, alloc)}
            study.enqueue_trial(params, user_attrs={"seed": label})


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _optimize(study: optuna.Study, ws: Workspace, trials: int | None, deadline: float | None,
              progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=trials, initial=_finished(study), desc="trials", disable=not progress, dynamic_ncols=True)

    def stop_when_done(study: optuna.Study, trial) -> None:
        done = _finished(study)
        bar.n = done
        try:
            bar.set_postfix(best=f"{study.best_value:.5f}")
        except ValueError:
            pass
        bar.refresh()
        if (trials is not None and done >= trials) or (deadline is not None and time.time() >= deadline):
            study.stop()

    if (trials is not None and _finished(study) >= trials) or (deadline is not None and time.time() >= deadline):
        return
    try:
        study.optimize(ws.objective, callbacks=[stop_when_done], gc_after_trial=False,
                       timeout=None if deadline is None else max(1.0, deadline - time.time()))
    finally:
        bar.close()


def _worker(settings: dict, out: str, storage: str | None, study_name: str, trials: int | None,
            deadline: float | None, device: str, batch_size: int, threads: int, worker: int) -> None:
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = SearchSettings(**settings)
    ws = Workspace(s, Path(out), device, batch_size)
    study = open_study(s, Path(out), storage, study_name, ws.space, worker)
    _optimize(study, ws, trials, deadline, progress=False)


def trials_frame(study: optuna.Study, ws: Workspace):
    """One row per trial: label, state, fitness at each fidelity, wall time, sampled and effective allocation,
    and the protocol every number was measured under."""
    import pandas as pd

    s = ws.settings
    protocol = {
        "model": ws.source, "budget": s.budget, "target_sparsity": ws.space.target, "pattern": s.pattern,
        "granularity": s.granularity, "pruner": s.pruner, "fitness_kind": s.fitness,
        "fitness_data": json.dumps(ws.heldout_protocol), "fitness_samples": s.fitness_samples,
        "low_fidelity_samples": s.low_fidelity_samples, "seqlen": ws.seqlen, "calib": json.dumps(ws.calib_protocol),
        "nsamples": s.nsamples, "seed": s.seed,
    }
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "label": t.user_attrs.get("seed", s.sampler),
               "guide": t.user_attrs.get("guide"),
               "fitness": t.value, "fitness_low": t.user_attrs.get("fitness_low", t.intermediate_values.get(0)),
               "wall_s": t.user_attrs.get("wall_s"), "budget_sparsity": t.user_attrs.get("budget_sparsity"),
               "start": t.datetime_start}
        alloc = t.user_attrs.get("allocation")
        for i, u in enumerate(ws.space.units):
            row[f"s[{u}]"] = alloc[i] if alloc else None
            row[param_name(u)] = t.params.get(param_name(u))
        rows.append({**row, **protocol})
    return pd.DataFrame(rows)


def _report_ppl(ws: Workspace, allocations: dict[str, np.ndarray], datasets: list[str], limit: int | None
                ) -> dict[str, dict[str, float]]:
    """Reporting data, never seen by the search: each allocation pruned for real with the sequential one-shot
    protocol (the way ``prunesearch prune --config`` realizes it), then perplexity."""
    from prunesearch import data
    from prunesearch.evaluate import perplexity
    from pruners.masks import Target
    from pruners.oneshot import make_pruner, prune_model

    s = ws.settings
    calib = ws.calibration_ids()
    streams = {d: data.eval_ids(ws.tokenizer, d, s.data_dir) for d in datasets}
    out: dict[str, dict[str, float]] = {}
    device = next(ws.model.parameters()).device
    for label, alloc in allocations.items():
        ws.realizer.apply({})
        targets = {n: Target(v, ws.m) for n, v in ws.space.to_targets(alloc).items()}
        prune_model(ws.model, make_pruner(s.pruner), targets, calib, device=device, batch_size=ws.batch_size)
        out[label] = {d: perplexity(ws.model, ids, ws.seqlen, ws.batch_size, limit) for d, ids in streams.items()}
    ws.realizer.apply({})
    return out


def run_search(settings: SearchSettings, out: Path, trials: int | None = None, time_budget: float | None = None,
               workers: int = 1, storage: str | None = None, study_name: str = "prunesearch",
               device: str = "cpu", batch_size: int = 8, report_ppl: tuple[str, ...] = ("wikitext2",),
               report_limit: int | None = None, progress: bool = True,
               guide: Callable[..., None] | None = None) -> dict:
    """Run (or resume) a search; writes trials.parquet, best_config.json and report.json into ``out``.

    ``guide`` replaces the plain optimize loop of this process (same arguments as ``_optimize``), e.g. the
    predictor-guided loop of ``search.guided.Guide``; extra workers still run the plain sampler."""
    if trials is None and time_budget is None:
        trials = 100
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    check_run_folder(settings, out)
    handler = logging.FileHandler(out / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("prunesearch", "optuna"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("prunesearch").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        ws = Workspace(settings, out, device, batch_size)
        study = open_study(settings, out, storage, study_name, ws.space)
        enqueue_seeds(study, ws, requeue_running=storage is None)
        deadline = time.time() + time_budget if time_budget else None
        procs = []
        interrupted = False
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            torch.set_num_threads(threads)
            ctx = mp.get_context("spawn")
            for worker in range(1, workers):
                p = ctx.Process(target=_worker, args=(dataclasses.asdict(settings), str(out), storage, study_name,
                                                      trials, deadline, device, batch_size, threads, worker))
                p.start()
                procs.append(p)
        try:
            (guide or _optimize)(study, ws, trials, deadline, progress)
        except KeyboardInterrupt:
            interrupted = True
            for p in procs:
                p.terminate()
        for p in procs:
            p.join()
        return finish(study, ws, out, report_ppl if not interrupted else (), report_limit, interrupted)
    finally:
        for name in ("prunesearch", "optuna"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def finish(study: optuna.Study, ws: Workspace, out: Path, report_ppl: tuple[str, ...], report_limit: int | None,
           interrupted: bool = False) -> dict:
    """Write the results folder and return the summary: best found against every heuristic seed."""
    from predictors.features import SpaceRecord

    frame = trials_frame(study, ws)
    frame.to_parquet(out / "trials.parquet", index=False)
    SpaceRecord.from_workspace(ws).save(out / "space.json")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return {"trials": len(frame), "best": None, "interrupted": interrupted}
    best = min(complete, key=lambda t: t.value)
    seeds = {t.user_attrs["seed"]: t for t in complete if "seed" in t.user_attrs}
    s = ws.settings
    meta = {"fitness": best.value, "fitness_kind": s.fitness, "trial": best.number,
            "label": best.user_attrs.get("seed", s.sampler), "budget": s.budget,
            "budget_sparsity": best.user_attrs["budget_sparsity"], "pruner": s.pruner, "model": ws.source,
            "granularity": s.granularity, "seqlen": ws.seqlen, "fitness_data": ws.heldout_protocol,
            "fitness_samples": s.fitness_samples, "calib": ws.calib_protocol, "nsamples": s.nsamples,
            "seed": s.seed}
    config = ws.space.to_config(np.asarray(best.user_attrs["allocation"]), s.pattern, meta)
    (out / "best_config.json").write_text(json.dumps(config, indent=2))
    summary = {
        "trials": len(frame), "complete": len(complete),
        "pruned": int((frame["state"] == "PRUNED").sum()), "interrupted": interrupted,
        "fitness_kind": s.fitness, "best": {"trial": best.number, "label": meta["label"], "fitness": best.value,
                                            "allocation": config["sparsity"]},
        "seeds": {label: {"trial": t.number, "fitness": t.value} for label, t in seeds.items()},
        "median_trial_s": float(frame.loc[frame["state"] == "COMPLETE", "wall_s"].median()),
    }
    if report_ppl:
        allocs = {"best": np.asarray(best.user_attrs["allocation"])}
        allocs.update({label: np.asarray(t.user_attrs["allocation"]) for label, t in seeds.items()})
        summary["report_ppl"] = _report_ppl(ws, allocs, list(report_ppl), report_limit)
        summary["report_protocol"] = {"datasets": list(report_ppl), "windows_limit": report_limit,
                                      "seqlen": ws.seqlen, "realized_with": f"{s.pruner} one-shot, sequential"}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
