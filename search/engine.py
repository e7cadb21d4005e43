"""The allocation search: an Optuna study whose trials are per-layer allocations meeting the budget exactly.

One process (or each of ``workers`` processes) holds a ``Workspace``: the model, the weight ranks of the
score-based pruner and the dense reference log-probabilities, all computed once and cached under the run
folder. A trial samples one sparsity per unit, projects it onto the budget, writes the masked weights and
measures KL to the dense model on held-out tokens: first on a few sequences (Optuna's pruner stops the poor
ones), then on all.

A budget range (``sparsity=0.6:0.8``) makes the study multi-objective: each trial also samples its budget, one of
21 evenly spaced levels across the range (so trials and seeds share exact budgets and stay comparable), and the
run keeps the Pareto front of fitness against sparsity instead of one best allocation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from pruners.registry import layout
from prunesearch.files import atomic_json, atomic_path, load_or_build, read_json
from prunesearch.safety import RunLock, UserError, mark_output
from search import faults, storage as storages
from search.samplers import allocation_key, make_sampler, param_name
from search.levels import LevelDatabase, LevelRealizer
from search.scores import Realizer, ScoreCache
from search.seeds import heuristic_seeds
from search.space import Space, make_space, parse_budget_range

log = logging.getLogger("prunesearch.search")

LEVEL_PARAM = "budget_level"  # a multi-objective trial's budget: level k of RANGE_LEVELS steps across the range
RANGE_LEVELS = 20
PRUNERS = ("wanda", "magnitude", "gblm", "sparsegpt")
# Default per-unit bounds: budget ± BOUND_WIDTH, inside [0, 0.99]. The best allocations of a real model span wide:
# SmolLM2-135M at 70% wants ~0.4 in the first blocks and ~0.9 in the last (a ± 0.2 box cut that optimum off).
BOUND_WIDTH = 0.35


# Measurement effort when the user gives none. A real model on CPU gets short sequences and few of them: on
# SmolLM2-135M with 2 cores a forward of 8 x 256 tokens takes seconds, and benchmarks/search_cost.py shows how few
# fitness sequences still rank candidates as the full set does. The built-in model and GPUs keep the full protocol.
EFFORT = {
    "builtin": {"nsamples": 128, "fitness_samples": 32, "low_fidelity_samples": 8},
    "gpu": {"nsamples": 128, "fitness_samples": 32, "low_fidelity_samples": 8},
    "cpu": {"seqlen": 256, "nsamples": 32, "fitness_samples": 16, "low_fidelity_samples": 4},
}


def default_effort(builtin: bool, device: str) -> dict:
    """The calibration and fitness sizes a search uses unless told otherwise (see ``EFFORT``)."""
    return dict(EFFORT["builtin" if builtin else "gpu" if device.startswith("cuda") else "cpu"])


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

    @property
    def multi_objective(self) -> bool:
        """A budget range: fitness and sparsity are both objectives (NSGA-II by default)."""
        return ":" in self.budget

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model, before anything is loaded or written."""
        if self.pruner not in PRUNERS:
            raise UserError(f"search pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if not 0 < self.level_step < 1:
            raise UserError(f"level step must be in (0, 1), got {self.level_step}")
        if self.fitness not in ("kl", "ppl"):
            raise UserError(f"fitness must be kl or ppl, got {self.fitness!r}")
        if not 0 < self.low_fidelity_samples <= self.fitness_samples:
            raise UserError("need 0 < low-fidelity samples <= fitness samples")
        if self.multi_objective and self.sampler == "evo":
            raise UserError("the evolutionary sampler keeps one budget; a budget range needs nsga2, tpe or qmc")
        if self.multi_objective and self.pruner == "sparsegpt":
            raise UserError("the SparseGPT level database is built for one budget; a budget range needs wanda, "
                            "magnitude or gblm")
        from pruners.masks import parse_pattern
        from search.space import check_budget_syntax

        parse_pattern(self.pattern)
        check_budget_syntax(self.budget)

    def signature(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, *fields: str) -> str:
        """A short hash of some settings, naming the cache files that depend on exactly those."""
        sig = self.signature()
        return hashlib.sha256(json.dumps({f: sig[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


class Workspace:
    """What one search process needs in memory: model, space, ranks, reference, and the fitness."""

    def __init__(self, settings: SearchSettings, out: Path, device: str = "cpu", batch_size: int = 8,
                 cache_dir: Path | None = None):
        from prunesearch import data
        from prunesearch.evaluate import DenseReference
        from prunesearch.models import default_seqlen, describe_model, load_model
        from pruners.masks import parse_pattern

        settings.validate()
        self.settings, self.out, self.batch_size = settings, out, batch_size
        self.model, self.tokenizer, self.source = load_model(settings.model, device)
        self.model_protocol = describe_model(self.source)
        self.lay = layout(self.model)
        self.seqlen = default_seqlen(self.model, settings.seqlen, builtin=settings.model is None)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.budget_kind, _, self.target_range = parse_budget_range(settings.budget, self.lay, self.total_params)
        self.multi = settings.multi_objective
        t_low, t_high = self.target_range
        low = settings.min_sparsity if settings.min_sparsity is not None else max(0.0, t_low - BOUND_WIDTH)
        high = settings.max_sparsity if settings.max_sparsity is not None else min(0.99, t_high + BOUND_WIDTH)
        self.space = make_space(self.lay, t_low, low, high, settings.granularity)
        self.space_at(t_high)  # both ends of a range must be feasible inside the bounds
        self.m = parse_pattern(settings.pattern)
        if self.m:
            from pruners.masks import check_pattern_fits_layout

            check_pattern_fits_layout(self.lay, self.m)
        cache = Path(cache_dir) if cache_dir is not None else out / "cache"  # --cache-dir: shared by workers
        cache.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self.calib_protocol = data.describe(settings.calib, settings.data_dir)
        self.heldout_protocol = data.describe("c4", settings.data_dir)

        if settings.pruner == "sparsegpt":
            self.scores = self._level_database(cache, device, batch_size)
            self.realizer = LevelRealizer(self.lay, self.scores)
        else:
            key = settings.key("model", "pruner", "pattern", "calib", "nsamples", "seqlen", "seed", "data_dir")
            path = cache / f"scores-{key}.safetensors"

            def build() -> ScoreCache:
                t = time.perf_counter()
                scores = ScoreCache.build(self.model, self.lay, settings.pruner, self.m, self.calibration_ids(),
                                          device, batch_size)
                log.info("ranked all weights in %.1fs", time.perf_counter() - t)
                return scores

            self.scores = load_or_build(path, ScoreCache.load, build, lambda c, tmp: c.save(tmp), "score cache")
            self.realizer = Realizer(self.lay, self.scores)

        self.heldout = data.heldout_ids(self.tokenizer, settings.fitness_samples, self.seqlen, settings.seed,
                                        settings.data_dir)
        ref_key = settings.key("model", "fitness_samples", "seqlen", "seed", "data_dir")
        ref_path = cache / f"reference-{ref_key}.safetensors"
        if settings.fitness == "kl":
            self.reference = DenseReference.cached(ref_path, self.model, self.heldout, batch_size)

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
        return load_or_build(cache / f"levels-{key}", LevelDatabase, lambda: self._build_levels(device, batch_size),
                             lambda db, tmp: db.move(tmp), "SparseGPT level database")

    def _build_levels(self, device: str, batch_size: int) -> LevelDatabase:
        import tempfile

        s = self.settings
        if self.m:
            grid = [k / self.m for k in range(self.m) if self.space.low - 1e-9 <= k / self.m <= self.space.high + 1e-9]
            unit_levels = [grid] * self.space.dim
        else:
            unit_levels = [lv.tolist() for lv in self.space.levels(s.level_step)]
        levels = {name: lv for unit, lv in zip(self.space.members, unit_levels) for name in unit}
        t = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix=".levels-building-", dir=self.cache)) / "db"
        db = LevelDatabase.build(self.model, self.lay, levels, self.m, self.calibration_ids(), folder, device,
                                 batch_size)
        log.info("built the SparseGPT level database (%d levels per unit at most) in %.1fs",
                 max(map(len, unit_levels)), time.perf_counter() - t)
        return db

    def space_at(self, target: float | None) -> Space:
        """The space whose budget is ``target`` (a multi-objective trial's own budget); the run's space for None."""
        return self.space if target is None else dataclasses.replace(self.space, target=float(target))

    def range_target(self, level: int) -> float:
        """The budget sparsity of level ``level`` (0 … RANGE_LEVELS) of a budget range."""
        low, high = self.target_range
        return low + (high - low) * level / RANGE_LEVELS

    def nonzero_params(self, alloc: np.ndarray) -> int:
        """Nonzero parameters of the whole model under an allocation (what a ``params=`` budget counts)."""
        return round(self.total_params - float(np.dot(self.space.sizes, alloc)))

    def allocation(self, x: np.ndarray, target: float | None = None) -> np.ndarray:
        """The effective allocation of sampled values: on the budget (``target`` for a multi-objective trial),
        inside the bounds, on the N:M grid (or, for the SparseGPT database, on its level grid)."""
        space = self.space_at(target)
        alloc = space.project(x)
        if self.m:
            return space.snap(alloc, self.m)
        if self.settings.pruner == "sparsegpt":
            return space.snap_levels(alloc, self.settings.level_step)
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

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """Fitness of the trial's allocation; with a budget range, (fitness, sparsity). A non-finite fitness or
        an out-of-memory error fails the trial with its reason recorded (``search.faults``)."""
        return faults.guarded(self._objective, trial, self.multi, getattr(self, "stop_rule", None))

    def _objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        t = time.perf_counter()
        x = np.array([trial.suggest_float(param_name(u), self.space.low, self.space.high) for u in self.space.units])
        target = self.range_target(trial.suggest_int(LEVEL_PARAM, 0, RANGE_LEVELS)) if self.multi else None
        alloc = self.allocation(x, target)
        sparsity = self.space.mean(alloc)
        trial.set_user_attr("allocation", alloc.tolist())
        trial.set_user_attr("budget_sparsity", sparsity)
        twin = _measured_twin(trial, alloc)
        if twin is not None:  # the same effective allocation was measured already: reuse, do not re-measure
            trial.set_user_attr("duplicate_of", twin.number)
            trial.set_user_attr("fitness_low", twin.user_attrs.get("fitness_low"))
            trial.set_user_attr("wall_s", time.perf_counter() - t)
            return tuple(twin.values) if self.multi else twin.value
        # seeds and predictor-chosen trials are always measured in full; multi-objective studies cannot prune
        full = "seed" in trial.user_attrs or "guide" in trial.user_attrs or self.multi
        try:
            result = self.measure(alloc, None if full else trial)
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - t)
        trial.set_user_attr("fitness_low", result["fitness_low"])
        # rounded so that allocations on the same budget level tie exactly instead of by float noise
        return (result["fitness"], round(sparsity, 9)) if self.multi else result["fitness"]


def _measured_twin(trial: optuna.Trial, alloc: np.ndarray) -> optuna.trial.FrozenTrial | None:
    """A completed trial of the study with the same effective allocation, if any (waiting for one that another
    worker is measuring now)."""
    return storages.measured_twin(trial, allocation_key(alloc))


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
    step = settings.level_step if settings.pruner == "sparsegpt" else 0.02
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
        for label, alloc in heuristic_seeds(ws.space_at(target), ws.scores.outlier_ratio).items():
            params = {param_name(u): float(v) for u, v in zip(ws.space.units, alloc)}
            if level is not None:
                label, params[LEVEL_PARAM] = f"{label}@{target:.4g}", level
            if label not in present:
                study.enqueue_trial(params, user_attrs={"seed": label})


def _finished(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: completed, pruned and failed with a reason (``search.faults``)."""
    return faults.counted(study.get_trials(deepcopy=False))


def _optimize(study: optuna.Study, ws: Workspace, trials: int | None, deadline: float | None,
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
    ws = Workspace(s, Path(out), device, batch_size, cache_dir)
    study = open_study(s, Path(out), storage, study_name, ws.space, worker, heartbeat)
    _optimize(study, ws, trials, deadline, progress=False)


def _target(ws: Workspace, t: optuna.trial.FrozenTrial) -> float | None:
    """A trial's budget sparsity; None for a range trial still queued (its budget level is not drawn yet)."""
    if not ws.multi:
        return ws.space.target
    level = t.params.get(LEVEL_PARAM)
    return None if level is None else ws.range_target(level)


def trials_frame(study: optuna.Study, ws: Workspace):
    """One row per trial: label, state, fitness at each fidelity, wall time, sampled and effective allocation,
    and the protocol every number was measured under."""
    import pandas as pd

    s = ws.settings
    protocol = {
        "model": ws.source, "model_protocol": json.dumps(ws.model_protocol), "budget": s.budget, "pattern": s.pattern,
        "granularity": s.granularity, "pruner": s.pruner, "fitness_kind": s.fitness,
        "fitness_data": json.dumps(ws.heldout_protocol), "fitness_samples": s.fitness_samples,
        "low_fidelity_samples": s.low_fidelity_samples, "seqlen": ws.seqlen, "calib": json.dumps(ws.calib_protocol),
        "nsamples": s.nsamples, "seed": s.seed,
    }
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "label": t.user_attrs.get("seed", s.sampler),
               "guide": t.user_attrs.get("guide"), "duplicate_of": t.user_attrs.get("duplicate_of"),
               "fail_reason": t.user_attrs.get(faults.FAIL_REASON), "worker": t.user_attrs.get("worker"),
               "fitness": t.values[0] if t.values else None,
               "fitness_low": t.user_attrs.get("fitness_low", t.intermediate_values.get(0)),
               "wall_s": t.user_attrs.get("wall_s"), "target_sparsity": _target(ws, t),
               "budget_sparsity": t.user_attrs.get("budget_sparsity"), "start": t.datetime_start}
        alloc = t.user_attrs.get("allocation")
        row["nonzero_params"] = ws.nonzero_params(np.asarray(alloc)) if alloc else None
        for i, u in enumerate(ws.space.units):
            row[f"s[{u}]"] = alloc[i] if alloc else None
            row[param_name(u)] = t.params.get(param_name(u))
        rows.append({**row, **protocol})
    return pd.DataFrame(rows)


def _report(ws: Workspace, allocations: dict[str, np.ndarray], datasets: list[str], limit: int | None
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Reporting data, never seen by the search: each allocation pruned for real with the sequential one-shot
    protocol (the way ``prunesearch prune --config`` realizes it), then perplexity and KL to the dense model on
    the same windows. Both are kept because they can disagree: pruning noise can lower the perplexity of a small
    model on text unlike its training data, while KL only measures the distance to the dense model.
    Returns ``{"ppl": {label: {dataset: value}}, "kl": {...}}``."""
    import math

    from prunesearch import data
    from prunesearch.evaluate import DenseReference, window_nll, windows
    from pruners.masks import Target
    from pruners.oneshot import make_pruner, prune_model

    s = ws.settings
    calib = ws.calibration_ids()
    ws.realizer.apply({})
    wins = {d: windows(data.eval_ids(ws.tokenizer, d, s.data_dir), ws.seqlen, limit) for d in datasets}
    refs = {d: DenseReference.compute(ws.model, w, ws.batch_size) for d, w in wins.items()}
    out: dict[str, dict[str, dict[str, float]]] = {"ppl": {}, "kl": {}}
    device = next(ws.model.parameters()).device
    for label, alloc in allocations.items():
        ws.realizer.apply({})
        targets = {n: Target(v, ws.m) for n, v in ws.space.to_targets(alloc).items()}
        prune_model(ws.model, make_pruner(s.pruner), targets, calib, device=device, batch_size=ws.batch_size)
        out["ppl"][label] = {d: math.exp(float(window_nll(ws.model, w, ws.batch_size).mean()))
                             for d, w in wins.items()}
        out["kl"][label] = {d: refs[d].kl(ws.model, ws.batch_size) for d in datasets}
    ws.realizer.apply({})
    return out


def run_search(settings: SearchSettings, out: Path, trials: int | None = None, time_budget: float | None = None,
               workers: int = 1, storage: str | None = None, study_name: str = "prunesearch",
               device: str = "cpu", batch_size: int = 8, report_ppl: tuple[str, ...] = ("wikitext2",),
               report_limit: int | None = None, progress: bool = True,
               guide: Callable[..., None] | None = None, cache_dir: Path | None = None,
               heartbeat: int = storages.HEARTBEAT_S) -> dict:
    """Run (or resume) a search; writes trials.parquet, best_config.json (for a budget range: the Pareto front,
    pareto.csv and pareto/*.json) and report.json into ``out``.

    ``guide`` replaces the plain optimize loop of this process (same arguments as ``_optimize``), e.g. the
    predictor-guided loop of ``search.guided.Guide``; extra workers still run the plain sampler.

    Refused settings leave ``out`` as it was (a folder created here is removed); the folder is locked for the
    run's life, so a second command on a live ``out`` is refused. The summary's ``stopped`` is the one-line
    cause when a run of failed trials stopped the search."""
    if trials is None and time_budget is None:
        trials = 100
    if workers < 1:
        raise UserError("--workers must be at least 1")
    settings.validate()
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
            ws = Workspace(settings, out, device, batch_size, cache_dir)
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
            (guide or _optimize)(study, ws, trials, deadline, progress)
        except KeyboardInterrupt:
            interrupted = True
            for p in procs:
                p.terminate()
        for p in procs:
            p.join()
        summary = finish(study, ws, out, report_ppl if not (interrupted or rule.failure) else (), report_limit,
                         interrupted)
        if rule.failure:
            summary["stopped"] = rule.failure
        return summary
    finally:
        for name in ("prunesearch", "optuna"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        lock.release()


def _config(ws: Workspace, t: optuna.trial.FrozenTrial) -> dict:
    """A trial's allocation as a ``prunesearch prune --config`` file, with the protocol of its fitness."""
    s = ws.settings
    meta = {"fitness": t.values[0], "fitness_kind": s.fitness, "trial": t.number,
            "label": t.user_attrs.get("seed", s.sampler), "budget": s.budget,
            "budget_sparsity": t.user_attrs["budget_sparsity"], "pruner": s.pruner, "model": ws.source,
            "model_protocol": ws.model_protocol, "granularity": s.granularity, "seqlen": ws.seqlen, "fitness_data": ws.heldout_protocol,
            "fitness_samples": s.fitness_samples, "calib": ws.calib_protocol, "nsamples": s.nsamples,
            "seed": s.seed}
    return ws.space.to_config(np.asarray(t.user_attrs["allocation"]), s.pattern, meta)


def _alloc(t: optuna.trial.FrozenTrial) -> np.ndarray:
    return np.asarray(t.user_attrs["allocation"])


def finish(study: optuna.Study, ws: Workspace, out: Path, report_ppl: tuple[str, ...], report_limit: int | None,
           interrupted: bool = False) -> dict:
    """Write the results folder and return the summary: best found against every heuristic seed."""
    from predictors.features import SpaceRecord

    frame = trials_frame(study, ws)
    with atomic_path(out / "trials.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    SpaceRecord.from_workspace(ws).save(out / "space.json")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return {"trials": len(frame), "best": None, "interrupted": interrupted}
    seeds = {t.user_attrs["seed"]: t for t in complete if "seed" in t.user_attrs}
    s = ws.settings
    summary = {
        "trials": len(frame), "complete": len(complete),
        "pruned": int((frame["state"] == "PRUNED").sum()), "interrupted": interrupted, "fitness_kind": s.fitness,
        "median_trial_s": float(frame.loc[frame["state"] == "COMPLETE", "wall_s"].median()),
    }
    if ws.multi:
        summary.update(_front(study, ws, out, seeds, report_ppl, report_limit))
    else:
        best = min(complete, key=lambda t: t.value)
        config = _config(ws, best)
        atomic_json(out / "best_config.json", config)
        summary["best"] = {"trial": best.number, "label": config["meta"]["label"], "fitness": best.value,
                           "allocation": config["sparsity"]}
        summary["seeds"] = {label: {"trial": t.number, "fitness": t.value} for label, t in seeds.items()}
        if report_ppl:
            allocs = {"best": _alloc(best), **{label: _alloc(t) for label, t in seeds.items()}}
            report = _report(ws, allocs, list(report_ppl), report_limit)
            summary["report_ppl"], summary["report_kl"] = report["ppl"], report["kl"]
    if report_ppl:
        summary["report_protocol"] = {"datasets": list(report_ppl), "windows_limit": report_limit,
                                      "seqlen": ws.seqlen, "realized_with": f"{s.pruner} one-shot, sequential"}
    atomic_json(out / "report.json", summary)
    from prunesearch.report import write_default

    write_default(out)
    return summary


def _front(study: optuna.Study, ws: Workspace, out: Path, seeds: dict, report_ppl: tuple[str, ...],
           report_limit: int | None) -> dict:
    """The Pareto front of a multi-objective run: ``pareto/*.json`` configs, ``pareto.csv``, ``pareto.png``, and
    every seed against the best front allocation at least as sparse as it."""
    import pandas as pd

    front = sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))
    rows = []
    with atomic_path(out / "pareto") as folder:  # rewritten from the study: a resumed run's front replaces the old
        folder.mkdir()
        for t in front:
            name = f"sparsity-{t.values[1]:.4f}-trial{t.number}.json"
            (folder / name).write_text(json.dumps(_config(ws, t), indent=2))
            rows.append({"trial": t.number, "label": t.user_attrs.get("seed", ws.settings.sampler),
                         "sparsity": t.values[1], "nonzero_params": ws.nonzero_params(_alloc(t)),
                         "fitness": t.values[0], "config": f"pareto/{name}"})
    with atomic_path(out / "pareto.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)

    def point(t: optuna.trial.FrozenTrial) -> dict:
        return {"trial": t.number, "fitness": t.values[0], "sparsity": t.values[1]}

    by_number = {t.number: t for t in front}
    versus = {}
    for label, t in seeds.items():
        at_least = [f for f in front if f.values[1] >= t.values[1] - 1e-9]
        versus[label] = {**point(t), "front": point(min(at_least, key=lambda f: f.values[0])) if at_least else None}
    _plot_front(study, front, seeds, ws.settings.fitness, out / "pareto.png")
    summary = {"objectives": [ws.settings.fitness, "sparsity"], "front": rows, "seeds": versus}
    if report_ppl:
        allocs = {label: _alloc(t) for label, t in seeds.items()}
        for label, v in versus.items():
            if label.startswith("uniform@") and v["front"] is not None:
                allocs[f"front@{label.partition('@')[2]}"] = _alloc(by_number[v["front"]["trial"]])
        report = _report(ws, allocs, list(report_ppl), report_limit)
        summary["report_ppl"], summary["report_kl"] = report["ppl"], report["kl"]
    return summary


def _plot_front(study: optuna.Study, front: list, seeds: dict, fitness_kind: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=8, c="0.7", label="trials")
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="C0", ms=4, label="Pareto front")
    families = sorted({label.partition("@")[0] for label in seeds})
    for i, family in enumerate(families):
        pts = [t for label, t in seeds.items() if label.partition("@")[0] == family]
        ax.scatter([t.values[1] for t in pts], [t.values[0] for t in pts], marker="x", c=f"C{i + 1}", label=family)
    ax.set(xlabel="mean sparsity", ylabel=f"{fitness_kind} (search data)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
