"""Heuristic allocations a user would otherwise pick; the search measures them first and must beat them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pruners.registry import ModelLayout
from pruners.targets import SparsityConfig
from pruners.width.allocation import global_ranking, uniform_params
from pruners.width.counting import Shapes
from pruners.width.geometry import BlockWidth, Geometry
from pruners.width.importance import Importance
from search.space import Space


def uniform(space: Space) -> np.ndarray:
    """Every unit at the budget sparsity."""
    return space.project(np.full(space.dim, space.target))


def owl(space: Space, outlier_ratio: list[float], lam: float = 0.08) -> np.ndarray:
    """OWL (Yin et al., 2024): blocks with more outliers (Wanda scores > M·mean, in %) are pruned less.

    Ratios are rescaled to [0, 2λ] and centred, so block sparsity lies in [p − λ, p + λ]; then projected onto
    the exact budget and bounds (a no-op for equal-size blocks inside the bounds).
    """
    d = np.asarray(outlier_ratio, dtype=np.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(d)
    keep = scaled - scaled.mean() + (1.0 - space.target)
    per_block = 1.0 - keep
    return space.project(per_block[list(space.blocks)])


def atp(space: Space, spread: float) -> np.ndarray:
    """ATP-style arithmetic progression: sparsity rising linearly with depth, ``spread`` from first to last block."""
    nblocks = max(space.blocks) + 1
    depth = np.asarray(space.blocks, dtype=np.float64) / max(nblocks - 1, 1)
    return space.project(space.target + spread * (depth - 0.5))


ATP_SPREADS = (0.1, 0.2, 0.3, 0.4, 0.5)


def heuristic_seeds(space: Space, outlier_ratio: list[float], spreads: tuple[float, ...] = ATP_SPREADS
                    ) -> dict[str, np.ndarray]:
    """The labelled seeds every search starts from: uniform, OWL (M=5, λ=0.08) and ATP over a grid of slopes.

    ATP's method is a grid search of its one slope, so the seeds span slopes up to the default bounds' width:
    on SmolLM2-135M the best slope is 0.3-0.4 at 60-70% (``benchmarks/search_quality.py``); a grid stopping at
    0.2 would make ATP look worse than it is."""
    seeds = {"uniform": uniform(space), "owl": owl(space, outlier_ratio)}
    for s in spreads:
        seeds[f"atp-{s:g}"] = atp(space, s)
    return seeds


def from_config(space: Space, lay: ModelLayout, config: SparsityConfig) -> np.ndarray:
    """A per-layer config (an earlier run's ``best_config.json``, or one a person wrote) as an allocation of this
    space: each unit takes the size-weighted mean of its projections' sparsities (so a block config spreads to
    its projections and a projection config averages into its blocks), projected onto the budget and bounds.
    Measured first, it lets a projection-level search start from a block-level answer (coarse to fine)."""
    targets = config.resolve(lay)
    x = [sum(lay.numel(n) * targets[n].sparsity for n in unit) / sum(lay.numel(n) for n in unit)
         for unit in space.members]
    return space.project(np.asarray(x, dtype=np.float64))


START = "start:"  # the label prefix of an --enqueue config: a starting point, not a heuristic to beat


def config_seeds(space: Space, lay: ModelLayout, paths: list[str]) -> dict[str, np.ndarray]:
    """The configs given with ``--enqueue``, labelled ``start:FILE`` (or ``start:FILE#k`` when names repeat)."""
    seeds: dict[str, np.ndarray] = {}
    for path in paths:
        label = f"{START}{Path(path).name}"
        if label in seeds:
            label = f"{label}#{len(seeds)}"
        seeds[label] = from_config(space, lay, SparsityConfig.load(path))
    return seeds


def width_seeds(geom: Geometry, imp: Importance, s: Shapes) -> dict[str, Callable[[float], list[BlockWidth]]]:
    """The labelled seeds of a width search, each as widths at a removed share of the blocks' parameters (the
    space fits the share to its budget): the same width in every block (``uniform-width``) and FLAP's global
    ranking of standardized group and channel scores (``flap``)."""
    return {"uniform-width": lambda removed: uniform_params(geom, s, removed),
            "flap": lambda removed: global_ranking(geom, imp, s, removed)}
