"""The widths-and-sparsity search space (``--space both``): per block the width units of ``search.width_space``
(``3.attn``, ``3.mlp``: kept key/value groups and MLP channels) plus one sparsity unit (``3.sparsity``: the
unstructured sparsity of the block's kept projection weights), under a ``params=`` budget that counts the nonzero
parameters of the model sliced to the widths and pruned to the sparsities.

A candidate is projected in two steps. Widths: the sampled shares, rounded, lowered only where they break a
``flops=``/``memory=``/``latency=`` limit (unstructured sparsity does not change those); widths that alone fit the
params budget are grown to it instead, as the width space does (a pure width candidate). Sparsities: with P_b the
kept projection weights of block b, Σ_b P_b (1 − s_b) + (all other parameters) = budget is a weighted-mean
projection (``search.space.Space.project`` with sizes P_b); Wanda prunes whole weights per output row
(``pruners.masks.pruned_count``), so when the exact nonzero count exceeds the budget the projection's goal is
lowered, by bisection, to the highest one whose exact count fits. Every candidate ends at most at the budget and
less than one weight per kept output row below it (in practice a row or two: one step of Wanda's counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pruners.width.counting import Shapes
from pruners.width.geometry import BlockWidth, Geometry
from prunesearch.safety import UserError
from search.budget import Budget
from search.settings import BOUND_WIDTH
from search.space import Space
from search.width_space import WidthSpace, make_width_space

MAX_SPARSITY = 0.99


def _pruned(n: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``pruners.masks.pruned_count`` over arrays: ⌊n·s⌋ weights of a row of ``n`` are pruned."""
    return np.floor(n * s + 1e-9)


@dataclass(frozen=True)
class BothSpace:
    """The width space (every limit of the budget; its bounds are the sampled shares'), the budget, the sampled
    sparsity bounds, and how a block's kept projection weights lie in rows: ``rows`` rows of length ``hidden`` per
    group and per channel (q/k/v; up/gate), and ``hidden`` rows of the attention output and down projections,
    ``span`` columns long per group or channel."""

    width: WidthSpace
    budget: int
    s_low: float
    s_high: float
    hidden: int
    rows: tuple[int, int]
    span: tuple[int, int]

    @property
    def free(self) -> WidthSpace:
        """The width space without the params limit (the limits widths alone must meet)."""
        return dataclasses.replace(self.width, constraints=tuple(c for c in self.width.constraints
                                                                 if c.kind != "params"))

    @property
    def blocks_n(self) -> int:
        return self.width.dim // 2

    @property
    def units(self) -> tuple[str, ...]:
        return self.width.units + tuple(f"{b}.sparsity" for b in range(self.blocks_n))

    @property
    def dim(self) -> int:
        return len(self.units)

    @property
    def low(self) -> np.ndarray:
        """Per unit, the lowest sampled value (a kept share or a sparsity)."""
        return np.r_[np.full(self.width.dim, self.width.low), np.full(self.blocks_n, self.s_low)]

    @property
    def high(self) -> np.ndarray:
        return np.r_[np.full(self.width.dim, self.width.high), np.full(self.blocks_n, self.s_high)]

    def split(self, alloc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept groups and channels per width unit, sparsity per block) of an allocation."""
        alloc = np.asarray(alloc, dtype=np.float64)
        return np.rint(alloc[:self.width.dim]).astype(np.int64), alloc[self.width.dim:]

    def kept_weights(self, kept: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Per block, the projection weights kept under widths ``kept`` and sparsities ``s`` (Wanda's per-row
        counts)."""
        groups, channels = np.asarray(kept, dtype=np.int64).reshape(-1, 2).T
        rows = groups * self.rows[0] + channels * self.rows[1]
        h = self.hidden
        total = rows * (h - _pruned(h, s))
        for n in (groups * self.span[0], channels * self.span[1]):
            total = total + h * (n - _pruned(n, s))
        return total

    def nonzero(self, alloc: np.ndarray) -> int:
        """Nonzero parameters of the whole model sliced and pruned to an allocation (what the budget counts)."""
        kept, s = self.split(alloc)
        return int(self.width.params(kept) - (self.kept_weights(kept, 0 * s) - self.kept_weights(kept, s)).sum())

    def widths_of(self, x: np.ndarray) -> np.ndarray:
        """The kept counts of sampled shares: as sampled within the width limits; grown to the params budget when
        they alone fit it."""
        kept = self.free.project(x, grow=False)
        return self.width.project(x) if self.width.feasible(kept) else kept

    def sparsities(self, kept: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per-block sparsities of sampled values ``x`` that bring the nonzero count under widths ``kept`` onto the
        budget (all at the lower bound when the widths alone fit it)."""
        sizes = self.kept_weights(kept, np.zeros(self.blocks_n)).astype(np.float64)
        rest = self.width.params(kept) - sizes.sum()
        blocks = tuple(range(self.blocks_n))

        def at(goal: float) -> np.ndarray:
            target = float(np.clip(1.0 - (goal - rest) / sizes.sum(), self.s_low, self.s_high))
            return Space(tuple(map(str, blocks)), sizes, target, self.s_low, self.s_high, ((),) * len(blocks),
                         blocks).project(x)

        def fits(s: np.ndarray) -> bool:
            return self.nonzero(np.r_[kept, s]) <= self.budget

        s = at(self.budget)
        if fits(s):
            return s
        # each kept row keeps less than one weight more than its continuous share: a goal lower by the row count
        # fits; bisect for the highest goal that does
        groups, channels = np.asarray(kept).reshape(-1, 2).T
        rows = int((groups * self.rows[0] + channels * self.rows[1]).sum()) + 2 * self.hidden * self.blocks_n
        lo, hi, s = self.budget - rows, self.budget, at(self.budget - rows)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            s_mid = at(mid)
            lo, hi, s = (mid, hi, s_mid) if fits(s_mid) else (lo, mid, s)
        return s

    def project(self, x: np.ndarray) -> np.ndarray:
        """The allocation of sampled values: kept counts per width unit, then sparsity per block."""
        x = np.asarray(x, dtype=np.float64)
        kept = self.widths_of(x[:self.width.dim])
        return np.r_[kept.astype(np.float64), self.sparsities(kept, x[self.width.dim:])]

    def removed_share(self, alloc: np.ndarray) -> float:
        """Share of the units' parameters (the model's at zero width excepted) the allocation removes, by slicing
        or pruning."""
        dense = self.width.params(self.width.counts)
        return float((dense - self.nonzero(alloc)) / (dense - self.width.fixed))

    def widths(self, alloc: np.ndarray) -> list[BlockWidth]:
        return self.width.widths(self.split(alloc)[0])

    def seeds(self, makers: dict) -> dict[str, np.ndarray]:
        """Labelled sampled values: dense widths at one uniform sparsity (``uniform-sparsity``); each width
        heuristic fitted to the budget with no sparsity (``uniform-width``, ``flap``: pure width); FLAP's widths at
        half that removal with uniform sparsity for the rest (``flap-half+sparsity``)."""
        n, dense = self.blocks_n, self.width.counts
        mean = 1.0 - (self.budget - (self.width.params(dense) - self.kept_weights(dense, np.zeros(n)).sum())) \
            / self.kept_weights(dense, np.zeros(n)).sum()
        uniform = np.full(n, float(np.clip(mean, self.s_low, self.s_high)))
        out = {"uniform-sparsity": np.r_[np.ones(self.width.dim), uniform]}
        for label, make in makers.items():
            kept = self.width.fit(make, label)
            out[label] = np.r_[self.width.shares(kept), np.zeros(n)]
            if label == "flap":
                half = self.width.kept(make(0.5 * self.width.removed_share(kept)))
                out["flap-half+sparsity"] = np.r_[self.width.shares(half), uniform]
        return out

    def at(self, bound: float) -> BothSpace:
        """The space whose nonzero-parameter budget is ``bound`` (a Pareto trial's own budget)."""
        width = self.width.at(bound) if self.width.ranged is not None else self.width
        return dataclasses.replace(self, budget=int(bound), width=width)

    def widened(self, seeds: dict[str, np.ndarray]) -> BothSpace:
        """The space whose lower share bound holds every seed's shares."""
        low = min([self.width.low] + [float(x[:self.width.dim].min()) for x in seeds.values()])
        return dataclasses.replace(self, width=dataclasses.replace(self.width, low=low))

    def to_config(self, alloc: np.ndarray, meta: dict | None = None) -> dict:
        """The ``width`` section of a width config plus per-block ``sparsity`` targets of the kept weights."""
        kept, s = self.split(alloc)
        out = self.width.to_config(kept)
        out |= {"sparsity": {str(b): float(v) for b, v in enumerate(s)}, "pattern": "unstructured"}
        if meta:
            out["meta"] = meta
        return out


def make_both_space(geom: Geometry, s: Shapes, budget: str, total_params: int, seqlen: int, prunable: int,
                    latency=None) -> BothSpace:
    """The space of ``budget`` (a ``params=`` limit or range, optionally with width limits) for a model whose prunable
    projections hold ``prunable`` weights (checked against the width geometry: every one must be a sliced one)."""
    parsed = Budget.parse(budget)  # validated by SearchSettings: a params= limit, the only one a range may move
    width = make_width_space(geom, s, budget, total_params, seqlen, latency)
    rows = ((geom.group + 2) * geom.head_dim, 2 if geom.gated else 1)
    span = (geom.group * geom.head_dim, 1)
    least = min(next(lim for lim in parsed.limits if lim.kind == "params").resolve(total_params))
    space = BothSpace(dataclasses.replace(width, high=1.0), int(least), 0.0, MAX_SPARSITY, geom.hidden, rows, span)
    space = space.at(least)  # the tightest budget decides feasibility and the sparsity bound
    n = space.blocks_n
    dense = space.kept_weights(width.counts, np.zeros(n)).sum()
    if dense != prunable:
        raise UserError(f"--space both: the model's prunable projections hold {prunable:,} weights but its heads and "
                        f"channels {dense:,}; this family has projections width pruning does not slice")
    mean = 1.0 - (space.budget - (width.params(width.counts) - dense)) / dense
    if mean > MAX_SPARSITY - 0.01:
        raise UserError(f"budget {budget!r} is infeasible for --space both: the dense widths would need "
                        f"{mean:.1%} sparsity (at most {MAX_SPARSITY - 0.01:.0%})")
    loosest = space.at(width.constraint("params").bound)
    return dataclasses.replace(loosest, s_high=float(min(MAX_SPARSITY, max(mean, 0.0) + BOUND_WIDTH)))
