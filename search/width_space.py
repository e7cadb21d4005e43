"""The width search space: per block two units, the share of key/value groups kept (attention) and the share of MLP
channels kept, under a ``params=`` budget that every candidate meets at or just under, in whole groups and channels.

A candidate's sampled shares are projected onto the budget as the sparsity space does (``Space.project`` on the
removed shares, weighted by each unit's parameters), rounded to whole groups and channels (at least one of each per
block), then repaired greedily: units rounded up the most give back one group or channel while the count is over the
budget, then units rounded down the most take one back while it still fits. The effective allocation is the kept
count of every unit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pruners.width.counting import Shapes
from pruners.width.geometry import BlockWidth, Geometry
from prunesearch.safety import UserError
from search.settings import BOUND_WIDTH
from search.space import Space, params_count

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class WidthSpace:
    """Units (``"3.attn"``, ``"3.mlp"``), their dense counts and parameters per group or channel, and the budget."""

    units: tuple[str, ...]
    blocks: tuple[int, ...]
    counts: np.ndarray  # dense key/value groups or MLP channels of each unit
    costs: np.ndarray  # parameters one group (with its query heads) or one channel costs
    fixed: int  # parameters at zero width: embeddings, norms, LM head, output biases
    budget: int  # the most parameters a candidate may have
    low: float  # bounds of a sampled kept share
    high: float
    group: int  # query heads per key/value group

    def __post_init__(self):
        least = self.params(np.ones(len(self.units), dtype=np.int64))
        dense = self.params(self.counts)
        if not least <= self.budget <= dense:
            raise UserError(f"budget of {self.budget:,} parameters is infeasible for --space width: the model has "
                            f"{dense:,}, and keeping one key/value group and one MLP channel per block needs "
                            f"{least:,}")

    @property
    def dim(self) -> int:
        return len(self.units)

    @property
    def sizes(self) -> np.ndarray:
        """Parameters of every unit at full width."""
        return self.counts * self.costs

    @property
    def target(self) -> float:
        """The parameter-weighted mean share kept that the budget allows."""
        return float((self.budget - self.fixed) / self.sizes.sum())

    def params(self, kept: np.ndarray) -> int:
        """All parameters of the model keeping ``kept`` groups and channels per unit."""
        return int(self.fixed + np.dot(np.asarray(kept, dtype=np.int64), self.costs.astype(np.int64)))

    def removed_share(self, kept: np.ndarray) -> float:
        """Share of the units' parameters an allocation removes (the width space's ``budget_sparsity``)."""
        return float(1.0 - np.dot(kept, self.costs) / self.sizes.sum())

    def shares(self, kept: np.ndarray) -> np.ndarray:
        return np.asarray(kept, dtype=np.float64) / self.counts

    def project(self, x: np.ndarray) -> np.ndarray:
        """The kept counts of sampled shares ``x``: on the budget, whole, at least one per unit, never over."""
        inner = Space(self.units, self.sizes.astype(np.float64), 1.0 - self.target, 1.0 - self.high, 1.0 - self.low,
                      tuple((u,) for u in self.units), self.blocks)
        real = self.counts * (1.0 - inner.project(1.0 - np.clip(np.asarray(x, dtype=np.float64), self.low,
                                                                self.high)))
        kept = np.clip(np.rint(real), 1, self.counts).astype(np.int64)
        slack = self.budget - self.params(kept)
        while slack < 0:
            i = int(np.argmax(np.where(kept > 1, kept - real, -np.inf)))
            kept[i] -= 1
            slack += int(self.costs[i])
        while True:
            fits = (kept < self.counts) & (self.costs <= slack)
            if not fits.any():
                return kept
            i = int(np.argmax(np.where(fits, real - kept, -np.inf)))
            kept[i] += 1
            slack -= int(self.costs[i])

    def widths(self, kept: np.ndarray) -> list[BlockWidth]:
        """Per-block widths of an allocation (query heads in whole key/value groups)."""
        pairs = np.asarray(kept, dtype=np.int64).reshape(-1, 2)
        return [BlockWidth(int(g) * self.group, int(g), int(c)) for g, c in pairs]

    def kept(self, widths: list[BlockWidth]) -> np.ndarray:
        """The allocation (kept counts per unit) of per-block widths."""
        return np.array([n for w in widths for n in (w.kv_heads, w.intermediate)], dtype=np.int64)

    def widened(self, allocations: list[np.ndarray]) -> WidthSpace:
        """The space with its sampling bounds widened to contain the kept shares of ``allocations`` (the seeds)."""
        shares = [self.shares(a) for a in allocations]
        return dataclasses.replace(self, low=min([self.low] + [float(x.min()) for x in shares]),
                                   high=max([self.high] + [float(x.max()) for x in shares]))

    def to_config(self, kept: np.ndarray, meta: dict | None = None) -> dict:
        """The allocation as the ``width`` section ``prunesearch prune --method width --config`` reads."""
        out: dict = {"width": {str(i): {"heads": w.heads, "intermediate": w.intermediate}
                               for i, w in enumerate(self.widths(kept))}}
        if meta:
            out["meta"] = meta
        return out


def make_width_space(geom: Geometry, s: Shapes, budget: str, total_params: int) -> WidthSpace:
    """The width space of a model at ``budget`` (``params=75%`` or ``params=100M``); sampled shares lie within
    ``BOUND_WIDTH`` of the budget's mean kept share."""
    kind, _, value = budget.partition("=")
    if kind != "params":
        raise UserError(f"--space width needs a params= budget, got {budget!r}")
    units = tuple(f"{i}.{k}" for i in range(len(geom.widths)) for k in KINDS)
    blocks = tuple(i for i in range(len(geom.widths)) for _ in KINDS)
    counts = np.array([n for w in geom.widths for n in (w.kv_heads, w.intermediate)], dtype=np.int64)
    costs = np.array([s.group_params(), s.channel_params()] * len(geom.widths), dtype=np.int64)
    fixed = s.other_params + sum(s.block_params(BlockWidth(0, 0, 0)) for _ in geom.widths)
    space = WidthSpace(units, blocks, counts, costs, fixed, int(params_count(value, total_params)), 0.0, 1.0,
                       geom.group)
    t = space.target
    return dataclasses.replace(space, low=max(t - BOUND_WIDTH, min(t, 0.01)), high=min(1.0, t + BOUND_WIDTH))
