"""What one search process holds (``Workspace``): the model, the space and its bounds, the pruner's ranks or
SparseGPT level database and the dense reference; it realizes an allocation and measures its fitness (a trial's
objective)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from pruners.registry import layout
from prunesearch.files import load_or_build
from search import faults, storage as storages
from search.fitness import make_fitness
from search.levels import LevelDatabase, LevelRealizer
from search.samplers import param_name
from search.scores import OutlierRatios, Realizer, ScoreCache, SequentialRealizer, dense_outlier_ratios
from search.settings import BOUND_WIDTH, LEVEL_PARAM, RANGE_LEVELS, SearchSettings
from search.space import Space, make_space, parse_budget_range

log = logging.getLogger("prunesearch.search")


class Workspace:
    """What one search process needs in memory: model, space, ranks, reference, and the fitness."""

    def __init__(self, settings: SearchSettings, out: Path, device: str = "cpu", batch_size: int = 8,
                 cache_dir: Path | None = None):
        from prunesearch import data
        from prunesearch.models import default_seqlen, describe_model, load_model

        settings.validate()
        self.settings, self.out, self.batch_size = settings, out, batch_size
        self.model, self.tokenizer, self.source = load_model(settings.model, device)
        self.model_protocol = describe_model(self.source)
        self.lay = layout(self.model)
        self.seqlen = default_seqlen(self.model, settings.seqlen, builtin=settings.model is None)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        cache = Path(cache_dir) if cache_dir is not None else out / "cache"  # --cache-dir: shared by workers
        self.cache = cache
        self._prepare_space(device, batch_size)
        cache.mkdir(parents=True, exist_ok=True)
        self.calib_protocol = data.describe(settings.calib, settings.data_dir)
        self.heldout_protocol = data.describe(settings.fitness_data, settings.data_dir, "heldout")
        self._prepare_realizer(device, batch_size)

        self.heldout = data.heldout_ids(self.tokenizer, settings.fitness_samples, self.seqlen, settings.seed,
                                        settings.data_dir, settings.fitness_data)
        ref_key = settings.key("model", "fitness_samples", "seqlen", "seed", "data_dir",
                               *(("fitness_data",) if settings.fitness_data != "c4" else ()))
        self.fitness = make_fitness(settings.fitness, self.model, self.heldout, batch_size,
                                    cache / f"reference-{ref_key}.safetensors")

    def _prepare_space(self, device: str, batch_size: int) -> None:
        """The budget and the space of per-unit sparsities (checked before any cache is written)."""
        from pruners.masks import parse_pattern

        settings = self.settings
        self.budget_kind, _, self.target_range = parse_budget_range(settings.budget, self.lay, self.total_params)
        self.multi = settings.multi_objective
        t_low, t_high = self.target_range
        low = settings.min_sparsity if settings.min_sparsity is not None else max(0.0, t_low - BOUND_WIDTH)
        high = settings.max_sparsity if settings.max_sparsity is not None else min(0.99, t_high + BOUND_WIDTH)
        self.space = make_space(self.lay, t_low, low, high, settings.granularity)
        self.space_at(t_high)  # both ends of a range must be feasible inside the bounds
        if settings.enqueue:  # a config naming layers this model lacks: one line before any cache is written
            from search.seeds import config_seeds

            config_seeds(self.space, self.lay, settings.enqueue)
        self.m = parse_pattern(settings.pattern)
        if self.m:
            from pruners.masks import check_pattern_fits_layout

            check_pattern_fits_layout(self.lay, self.m)

    def _prepare_realizer(self, device: str, batch_size: int) -> None:
        """The pruner's cached weight ranks (or SparseGPT level database; with candidate inputs, OWL's ratios alone)
        and the realizer that applies them."""
        settings, cache = self.settings, self.cache
        if settings.realizer == "levels":
            self.scores = self._level_database(cache, device, batch_size)
            self.realizer = LevelRealizer(self.lay, self.scores)
        elif settings.stats_inputs == "candidate":
            self.scores = self._outlier_ratios(device, batch_size)
            calib = self.calibration_ids()[:settings.candidate_nsamples]
            self.realizer = SequentialRealizer(self.model, self.lay, settings.pruner, self.m, calib, device,
                                               batch_size)
        else:
            self.scores = self._score_cache(device, batch_size)
            self.realizer = Realizer(self.lay, self.scores)

    def _score_cache(self, device: str, batch_size: int) -> ScoreCache:
        """The pruner's ranks of every weight of the dense model, cached per calibration protocol."""
        settings = self.settings
        key = settings.key("model", "pruner", "pattern", "calib", "nsamples", "seqlen", "seed", "data_dir",
                           "stats_inputs", *(("budget",) if settings.stats_inputs == "pruned" else ()))

        def build() -> ScoreCache:
            t = time.perf_counter()
            scores = ScoreCache.build(self.model, self.lay, settings.pruner, self.m, self.calibration_ids(),
                                      device, batch_size, self.stats_prefix())
            log.info("ranked all weights in %.1fs", time.perf_counter() - t)
            return scores

        return load_or_build(self.cache / f"scores-{key}.safetensors", ScoreCache.load, build,
                             lambda c, tmp: c.save(tmp), "score cache")

    def _outlier_ratios(self, device: str, batch_size: int) -> OutlierRatios:
        """OWL's ratios of the dense model (one calibration walk), cached per calibration protocol."""
        key = self.settings.key("model", "calib", "nsamples", "seqlen", "seed", "data_dir")

        def build() -> OutlierRatios:
            return OutlierRatios(dense_outlier_ratios(self.model, self.lay, self.calibration_ids(), device,
                                                      batch_size))

        return load_or_build(self.cache / f"outliers-{key}.json", OutlierRatios.load, build,
                             lambda r, tmp: r.save(tmp), "outlier ratios")

    def calibration_ids(self) -> torch.Tensor:
        """The calibration sequences the pruner's statistics come from (also used to realize the report)."""
        from prunesearch import data

        s = self.settings
        return data.calibration_ids(self.tokenizer, s.calib, s.nsamples, self.seqlen, s.seed, s.data_dir)

    def _level_database(self, cache: Path, device: str, batch_size: int) -> LevelDatabase:
        """Load or build the SparseGPT level database of this space (levels on the grid ``allocation`` snaps to)."""
        s = self.settings
        key = s.key("model", "pattern", "calib", "nsamples", "seqlen", "seed", "data_dir", "budget", "granularity",
                    "min_sparsity", "max_sparsity", "level_step", "stats_inputs")
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
                                 batch_size, prefix=self.stats_prefix())
        log.info("built the SparseGPT level database (%d levels per unit at most) in %.1fs",
                 max(map(len, unit_levels)), time.perf_counter() - t)
        return db

    def stats_prefix(self) -> float | None:
        """With ``--stats-inputs pruned``, the sparsity every earlier block is pruned at while the statistics are
        gathered: the budget (the middle of a range), on the N:M grid; None for dense inputs."""
        if self.settings.stats_inputs != "pruned":
            return None
        target = sum(self.target_range) / 2
        return round(target * self.m) / self.m if self.m else target

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
        if self.settings.realizer == "levels":
            return space.snap_levels(alloc, self.settings.level_step)
        return alloc

    def realize(self, alloc: np.ndarray) -> None:
        self.realizer.apply(self.space.to_targets(alloc))

    def effective_key(self, alloc: np.ndarray) -> tuple[int, ...]:
        """What the realized model depends on: how many weights each selection group (an output row for a
        per-row pruner, else the whole matrix) of every projection loses. Allocations closer than one weight per
        row prune alike, so they are one allocation: a 70% search on SmolLM2 measured such twins five times."""
        from pruners.masks import pruned_count

        return tuple(pruned_count(g, float(v)) for v, groups in zip(alloc, self._groups) for g in groups)

    @functools.cached_property
    def _groups(self) -> list[list[int]]:
        """The selection-group size of each member of each unit (``effective_key``)."""
        from pruners.methods import get_method
        from pruners.registry import get_weight

        row = get_method(self.settings.pruner).selection == "row"
        shapes = {n: get_weight(self.lay.projections[self.lay.block_of(n)][n]).shape
                  for n in self.lay.projection_names()}
        return [[shapes[n][1] if row else shapes[n][0] * shapes[n][1] for n in unit] for unit in self.space.members]

    def reset(self) -> None:
        """Put the dense weights back."""
        self.realizer.apply({})

    def seeds(self, target: float | None = None) -> dict[str, np.ndarray]:
        """The labelled heuristic seeds and ``--enqueue`` configs as sampled values (at ``target`` for a range)."""
        from search.seeds import config_seeds, heuristic_seeds

        space = self.space_at(target)
        return {**heuristic_seeds(space, self.scores.outlier_ratio),
                **config_seeds(space, self.lay, self.settings.enqueue)}

    trade_label = "mean sparsity"  # what a Pareto run's second objective is

    def budget_attrs(self, alloc: np.ndarray) -> dict:
        """What a trial records about its allocation's budget."""
        return {"budget_sparsity": self.space.mean(alloc)}

    def budget_columns(self, t) -> dict:
        """Extra columns of the trials table about a trial's budget (none: ``budget_sparsity`` says it all)."""
        return {}

    def unit_values(self, alloc: np.ndarray) -> dict[str, float]:
        """An allocation per unit, as the summary shows it (sparsity)."""
        return {u: float(v) for u, v in zip(self.space.units, alloc)}

    def unit_columns(self, alloc: list | None) -> dict:
        """An allocation's per-unit columns of the trials table (``s[unit]``, the sparsity)."""
        return {f"s[{u}]": alloc[i] if alloc else None for i, u in enumerate(self.space.units)}

    def config(self, alloc: np.ndarray, meta: dict) -> dict:
        """An allocation as the config file ``prunesearch prune --config`` reads."""
        return self.space.to_config(alloc, self.settings.pattern, meta)

    @property
    def realized_with(self) -> str:
        return f"{self.settings.pruner} one-shot, sequential"

    def prune_for_report(self, alloc: np.ndarray, calib: torch.Tensor) -> None:
        """Prune the dense model to ``alloc`` for real, as ``prunesearch prune --config`` would (report data)."""
        from pruners.masks import Target
        from pruners.oneshot import make_pruner, prune_model

        targets = {n: Target(v, self.m) for n, v in self.space.to_targets(alloc).items()}
        prune_model(self.model, make_pruner(self.settings.pruner), targets, calib,
                    device=next(self.model.parameters()).device, batch_size=self.batch_size)

    def space_record(self):
        """The facts the accuracy predictor's features need (``predictors.features.SpaceRecord``)."""
        from predictors.features import SpaceRecord

        return SpaceRecord.from_workspace(self)

    def measure(self, alloc: np.ndarray, trial: optuna.Trial | None = None) -> dict:
        """Realize and score an allocation at both fidelities; a ``trial`` may be pruned after the first. The
        per-sequence terms (``fitness_rows``, mean per token) let a caller tell a real gain from sampling noise."""
        self.realize(alloc)
        n_low = self.settings.low_fidelity_samples
        low, tokens = self.fitness.rows(self.model, 0, n_low)
        low_value = self.fitness.value(float(low.sum()), low.numel() * tokens)
        if trial is not None:
            trial.report(low_value, step=0)
            if trial.should_prune():
                raise optuna.TrialPruned
        rest, _ = self.fitness.rows(self.model, n_low, self.heldout.shape[0])
        rows = torch.cat([low, rest])
        return {"fitness_low": low_value, "fitness": self.fitness.value(float(rows.sum()), rows.numel() * tokens),
                "fitness_rows": (rows / tokens).tolist()}

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """Fitness of the trial's allocation; with a budget range, (fitness, sparsity). A non-finite fitness or
        an out-of-memory error fails the trial with its reason recorded (``search.faults``)."""
        return faults.guarded(self._objective, trial, self.multi, getattr(self, "stop_rule", None))

    def suggest(self, trial: optuna.Trial) -> np.ndarray:
        """The trial's sampled value of every unit, inside the space's bounds."""
        return np.array([trial.suggest_float(param_name(u), self.space.low, self.space.high)
                         for u in self.space.units])

    def _objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        t = time.perf_counter()
        x = self.suggest(trial)
        target = self.range_target(trial.suggest_int(LEVEL_PARAM, 0, RANGE_LEVELS)) if self.multi else None
        alloc = self.allocation(x, target)
        trial.set_user_attr("allocation", alloc.tolist())
        attrs = self.budget_attrs(alloc)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        twin = storages.measured_twin(trial, self.effective_key(alloc), self.effective_key)
        if twin is not None:  # the same effective allocation was measured already: reuse, do not re-measure
            trial.set_user_attr("duplicate_of", twin.number)
            trial.set_user_attr("fitness_low", twin.user_attrs.get("fitness_low"))
            trial.set_user_attr("fitness_rows", twin.user_attrs.get("fitness_rows"))
            trial.set_user_attr("wall_s", time.perf_counter() - t)
            return tuple(twin.values) if self.multi else twin.value
        # seeds and predictor-chosen trials are always measured in full; multi-objective studies cannot prune
        full = "seed" in trial.user_attrs or "guide" in trial.user_attrs or self.multi
        try:
            result = self.measure(alloc, None if full else trial)
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - t)
        trial.set_user_attr("fitness_low", result["fitness_low"])
        trial.set_user_attr("fitness_rows", result["fitness_rows"])
        # rounded so that allocations on the same budget level tie exactly instead of by float noise
        return (result["fitness"], round(attrs["budget_sparsity"], 9)) if self.multi else result["fitness"]
