"""Measured (allocation, fitness) pairs from search runs, as feature matrices a predictor trains or is scored on.

A run folder holds ``trials.parquet`` (the effective allocation of every trial, ``s[unit]`` or, for a width run,
``w[unit]``, and its fitness) and ``space.json`` (its ``SpaceRecord`` or ``WidthRecord``). Extra pairs come as a
parquet of *features* (the spec's column names plus ``fitness``, ``model``, ``budget``, ``fitness_kind``), which is
what ``export_pairs`` writes, so pairs from any model can be pooled without its space. Pairs of different models or
budget kinds are refused unless mixing is asked for; different fitness kinds (KL vs perplexity) never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from predictors.features import features, load_record
from prunesearch.files import read_parquet
from prunesearch.safety import UserError

META = ("fitness", "model", "budget", "fitness_kind")


@dataclass
class Pairs:
    """Feature rows, fitness values and where each row came from."""

    X: np.ndarray
    y: np.ndarray
    source: list[str] = field(default_factory=list)
    model: list[str] = field(default_factory=list)
    budget: list[str] = field(default_factory=list)
    fitness_kind: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def to_frame(self, spec: dict) -> pd.DataFrame:
        frame = pd.DataFrame(self.X, columns=spec["names"])
        frame["fitness"], frame["model"], frame["budget"] = self.y, self.model, self.budget
        frame["fitness_kind"], frame["source"] = self.fitness_kind, self.source
        return frame


def run_pairs(run: Path, spec: dict) -> Pairs:
    """Features and fitness of every completed trial of a run folder."""
    run = Path(run)
    trials, space = run / "trials.parquet", run / "space.json"
    if not trials.exists():
        raise UserError(f"{run} has no trials.parquet: not a finished prunesearch search run")
    if not space.exists():
        raise UserError(f"{run} has no space.json (runs of older versions): re-run its search command once, "
                        "which resumes without new trials and writes it")
    rec = load_record(space)
    if rec.space != spec.get("space", "sparsity"):
        raise UserError(f"{run} is a {rec.space} run; these features describe {spec.get('space', 'sparsity')} "
                        "allocations")
    frame = read_parquet(trials, "trials table")
    cols = rec.columns
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise UserError(f"{trials} lacks the allocation columns {missing[:3]} of its space.json")
    done = frame[(frame.state == "COMPLETE") & frame.fitness.notna()]
    if "duplicate_of" in done.columns:  # re-uses of an earlier measurement are not new pairs
        done = done[done.duplicate_of.isna()]
    if done.empty:
        raise UserError(f"{run} has no completed trials to learn from")
    n = len(done)
    return Pairs(features(done[cols].to_numpy(dtype=np.float64), rec, spec), done.fitness.to_numpy(np.float64),
                 [str(run)] * n, [rec.model] * n, [rec.budget] * n, [rec.fitness_kind] * n)


def pairs_space(runs: list[Path], files: list[Path]) -> str:
    """The one search space (``sparsity`` or ``width``) of the runs and pairs files a predictor learns from."""
    found = {}
    for run in runs:
        space = Path(run) / "space.json"
        found[str(run)] = load_record(space).space if space.exists() else "sparsity"  # run_pairs says what lacks
    for path in files:  # kept_params is a width feature only
        found[str(path)] = "width" if "kept_params" in read_parquet(path, "pairs file").columns else "sparsity"
    spaces = sorted(set(found.values()))
    if len(spaces) > 1:
        raise UserError("pairs come from " + " and ".join(spaces) + " searches (" + ", ".join(
            f"{k}: {v}" for k, v in found.items()) + "); a predictor learns the features of one space")
    return spaces[0] if spaces else "sparsity"


def file_pairs(path: Path, spec: dict) -> Pairs:
    """Pairs from a features parquet (see ``export_pairs``)."""
    frame = read_parquet(path, "pairs file")
    missing = [c for c in list(spec["names"]) + list(META) if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing columns {missing[:4]}{'…' if len(missing) > 4 else ''}; a pairs file "
                        f"holds the feature columns of spec v{spec['version']} ({spec['depth_bins']} depth bins) "
                        "plus fitness, model, budget, fitness_kind (see `predictor retrain --export-pairs`)")
    if frame.empty:
        raise UserError(f"{path} holds no pairs")
    fitness = pd.to_numeric(frame.fitness, errors="coerce").to_numpy(np.float64)
    if not (np.isfinite(fitness) & (fitness > 0)).all():
        raise UserError(f"{path}: every fitness must be a finite positive number (a measured KL or perplexity)")
    n = len(frame)
    return Pairs(frame[spec["names"]].to_numpy(np.float64), fitness, [str(path)] * n,
                 frame.model.astype(str).tolist(), frame.budget.astype(str).tolist(),
                 frame.fitness_kind.astype(str).tolist())


def combine(parts: list[Pairs], allow_mixed: bool = False) -> Pairs:
    """Concatenate pair sets, refusing mixed models or budget kinds (unless allowed) and mixed fitness kinds."""
    if not parts:
        raise UserError("no pairs given: pass at least one --from RUN or --pairs FILE")
    out = Pairs(np.concatenate([p.X for p in parts]), np.concatenate([p.y for p in parts]),
                sum((p.source for p in parts), []), sum((p.model for p in parts), []),
                sum((p.budget for p in parts), []), sum((p.fitness_kind for p in parts), []))
    kinds = sorted(set(out.fitness_kind))
    if len(kinds) > 1:
        raise UserError(f"pairs measure different fitness kinds {kinds}; their values are not comparable")
    check_compatible(out, allow_mixed)
    return out


def check_compatible(p: Pairs, allow_mixed: bool, against: dict | None = None) -> None:
    """Refuse pairs of several models or budget kinds (or other than ``against``'s) unless ``allow_mixed``."""
    models = set(p.model) | ({against["model"]} if against else set())
    budget_kinds = {b.partition("=")[0] for b in p.budget} | (
        {against["budget"].partition("=")[0]} if against else set())
    if allow_mixed:
        return
    if len(models) > 1:
        raise UserError(f"pairs come from different models ({', '.join(sorted(models))}); pass --allow-mixed "
                        "to pool them anyway")
    if len(budget_kinds) > 1:
        raise UserError(f"pairs come from different budget kinds ({', '.join(sorted(budget_kinds))}); pass "
                        "--allow-mixed to pool them anyway")
