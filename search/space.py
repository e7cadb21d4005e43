"""Search spaces of per-layer sparsity allocations, and the budget every candidate must meet exactly.

A *unit* is what gets one sparsity: a decoder block (named by its index, default) or a single projection (by
its module name), so unit names are exactly the keys of the per-layer config schema. An allocation is one
sparsity per unit; its budget is the parameter-weighted mean sparsity over all prunable weights.
"""

from __future__ import annotations


from dataclasses import dataclass

import numpy as np

from pruners.registry import ModelLayout
from prunesearch.safety import UserError
from search.budget import Budget


@dataclass(frozen=True)
class Space:
    """The units of an allocation, their weight counts, bounds and the target mean sparsity."""

    units: tuple[str, ...]
    sizes: np.ndarray  # weights per unit
    target: float
    low: float
    high: float
    members: tuple[tuple[str, ...], ...]  # the projections each unit stands for
    blocks: tuple[int, ...]  # the block each unit lies in
    kinds: tuple[str, ...] = ()  # projection-level spaces: each unit's name inside its block (``mlp.down_proj``)

    def __post_init__(self):
        if not 0.0 <= self.low <= self.high < 1.0:
            raise UserError(f"bounds must satisfy 0 <= min <= max < 1, got [{self.low}, {self.high}]")
        if not self.low <= self.target <= self.high:
            raise UserError(
                f"budget sparsity {self.target:.4f} is infeasible inside the bounds [{self.low}, {self.high}]"
            )

    @property
    def dim(self) -> int:
        return len(self.units)

    def mean(self, alloc: np.ndarray) -> float:
        """Parameter-weighted mean sparsity of an allocation."""
        return float(np.dot(self.sizes, alloc) / self.sizes.sum())

    def project(self, x: np.ndarray, tol: float = 1e-12) -> np.ndarray:
        """The allocation clip(x + τ, low, high) whose weighted mean is exactly the target (``x`` one allocation,
        or a batch of them as rows).

        τ is found by bisection (the mean is monotone in τ), all rows in parallel; a final correction on the units
        strictly inside the bounds removes the remaining rounding error, so the budget holds to float precision.
        """
        x = np.clip(np.asarray(x, dtype=np.float64), self.low, self.high)
        rows = np.atleast_2d(x)
        w = self.sizes / self.sizes.sum()
        lo, hi = self.low - rows.max(axis=1) - 1.0, self.high - rows.min(axis=1) + 1.0
        for _ in range(200):
            tau = 0.5 * (lo + hi)
            below = np.clip(rows + tau[:, None], self.low, self.high) @ w < self.target
            lo, hi = np.where(below, tau, lo), np.where(below, hi, tau)
            if np.all(hi - lo < tol):
                break
        s = np.clip(rows + (0.5 * (lo + hi))[:, None], self.low, self.high)
        free = (s > self.low) & (s < self.high)
        share = np.where(free, w, 0.0).sum(axis=1)
        gap = (self.target - s @ w) / np.where(share > 0, share, 1.0)
        s = np.clip(s + np.where(free, gap[:, None], 0.0), self.low, self.high)
        return s[0] if x.ndim == 1 else s

    def project_many(self, x: np.ndarray) -> np.ndarray:
        """On-budget allocations of many sampled points (rows) at once (the guided search screens thousands)."""
        return self.project(np.atleast_2d(x))

    def sampled(self, alloc: np.ndarray) -> np.ndarray:
        """The sampled point an allocation corresponds to: the allocation itself (a sparsity per unit)."""
        return np.asarray(alloc, dtype=np.float64)

    def snap(self, alloc: np.ndarray, m: int) -> np.ndarray:
        """Round an on-budget allocation to multiples of 1/m (N:M levels), keeping the pruned-weight count as
        close to the budget as the grid allows (exact for equal-size units when target·m·units is whole)."""
        scaled = alloc * m
        base = np.floor(scaled + 1e-9)
        need = self.target * self.sizes.sum() * m - np.dot(self.sizes, base)
        for i in np.argsort(-(scaled - base), kind="stable"):
            if need < self.sizes[i] / 2 or base[i] + 1 > self.high * m + 1e-9:
                continue
            base[i] += 1
            need -= self.sizes[i]
        return base / m

    def level_steps(self, step: float) -> np.ndarray:
        """Per-unit sparsity step of the equal-nonzero level grid: one level on any unit is the same number of
        weights (``step`` × the mean unit size), so one level up on a unit and one down on another keeps the
        budget (EvoPress's level switch). Equal-size units all get ``step``."""
        return step * self.sizes.mean() / self.sizes

    def level_range(self, step: float) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest level index k of every unit, level k being ``target + k·δ`` inside the bounds."""
        delta = self.level_steps(step)
        return (np.ceil((self.low - self.target) / delta - 1e-9).astype(int),
                np.floor((self.high - self.target) / delta + 1e-9).astype(int))

    def levels(self, step: float) -> list[np.ndarray]:
        """Every unit's level sparsities, lowest first."""
        delta, (kmin, kmax) = self.level_steps(step), self.level_range(step)
        return [self.target + np.arange(a, b + 1) * d for a, b, d in zip(kmin, kmax, delta)]

    def snap_levels(self, alloc: np.ndarray, step: float) -> np.ndarray:
        """Round an on-budget allocation to the level grid with the level indices summing to zero, so the
        pruned-weight count is exactly the budget's; the largest remainders round up, as in apportionment."""
        delta, (kmin, kmax) = self.level_steps(step), self.level_range(step)
        k = (np.asarray(alloc, dtype=np.float64) - self.target) / delta
        base = np.clip(np.floor(k + 1e-9), kmin, kmax).astype(int)
        rest = k - base
        while base.sum() < 0:
            i = max((j for j in range(self.dim) if base[j] < kmax[j]), key=lambda j: rest[j])
            base[i] += 1
            rest[i] -= 1
        while base.sum() > 0:
            i = min((j for j in range(self.dim) if base[j] > kmin[j]), key=lambda j: rest[j])
            base[i] -= 1
            rest[i] += 1
        return self.target + base * delta

    def to_targets(self, alloc: np.ndarray) -> dict[str, float]:
        """Per-projection sparsities for an allocation (every member of a unit gets the unit's value)."""
        return {name: float(v) for unit, v in zip(self.members, alloc) for name in unit}

    def to_config(self, alloc: np.ndarray, pattern: str = "unstructured", meta: dict | None = None) -> dict:
        """The allocation in the JSON schema ``prunesearch prune --config`` reads."""
        out = {"sparsity": {u: float(v) for u, v in zip(self.units, alloc)}, "pattern": pattern}
        if meta:
            out["meta"] = meta
        return out


def make_space(lay: ModelLayout, target: float, low: float, high: float, granularity: str = "block") -> Space:
    """Units per block (``block``) or per projection (``projection``) of a model layout."""
    if granularity == "block":
        units = tuple(str(i) for i in range(lay.num_blocks))
        members = tuple(tuple(block) for block in lay.projections)
        kinds: tuple[str, ...] = ()
    elif granularity == "projection":
        units = tuple(lay.projection_names())
        members = tuple((u,) for u in units)
        kinds = tuple(map(lay.local_name, units))
    else:
        raise UserError(f"granularity must be 'block' or 'projection', got {granularity!r}")
    sizes = np.array([sum(lay.numel(n) for n in m) for m in members], dtype=np.float64)
    blocks = tuple(lay.block_of(m[0]) for m in members)
    return Space(units, sizes, target, low, high, members, blocks, kinds)


def parse_budget(text: str, lay: ModelLayout, total_params: int) -> tuple[str, float, float]:
    """``sparsity=0.7`` or ``params=N`` (all parameters of the whole model: ``4.5M`` or ``75%``) → the mean
    sparsity over prunable weights that meets it. Returns (kind, value, target sparsity)."""
    kind, (value, _), (target, _) = _sparsity_targets(Budget.parse(text), lay, total_params)
    return kind, value, target


def parse_budget_range(text: str, lay: ModelLayout, total_params: int) -> tuple[str, str, tuple[float, float]]:
    """A budget or a budget range such as ``sparsity=0.6:0.8`` or ``params=4M:6M`` (a multi-objective run trades
    fitness against the budget inside the range). Returns (kind, value text, (lowest, highest) target sparsity);
    a single budget gives equal ends."""
    budget = Budget.parse(text)
    kind, _, targets = _sparsity_targets(budget, lay, total_params)
    return kind, budget.limits[0].text.partition("=")[2], targets


def _sparsity_targets(budget: Budget, lay: ModelLayout, total_params: int
                      ) -> tuple[str, tuple[float, float], tuple[float, float]]:
    """(kind, (low, high) value, (low, high) mean sparsity of the prunable weights) of a sparsity-space budget."""
    if len(budget.limits) > 1 or budget.kinds[0] not in ("sparsity", "params"):
        raise UserError(f"budget {budget.text!r}: the sparsity space takes one sparsity= or params= budget; flops=, "
                        "memory= and latency= count removed heads and channels (--space width), which unstructured "
                        "sparsity does not change")
    (limit,) = budget.limits
    if limit.kind == "sparsity":
        return "sparsity", limit.resolve(1.0), limit.resolve(1.0)
    prunable = sum(lay.numel(n) for n in lay.projection_names())
    fixed = total_params - prunable
    low, high = limit.resolve(total_params)
    targets = sorted(1.0 - (count - fixed) / prunable for count in (low, high))
    if not (0.0 <= targets[0] and targets[1] < 1.0):
        raise UserError(f"budget {limit.text} is infeasible: the model has {total_params:,} parameters of which "
                        f"{fixed:,} are not prunable")
    return "params", (low, high), (targets[0], targets[1])
