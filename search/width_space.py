"""The width search space: per block two units, the share of key/value groups kept (attention) and the share of MLP
channels kept, under a budget of one or several limits (``params=``, ``flops=``, ``memory=``, ``latency=``;
``search.budget``) that every candidate meets, in whole groups and channels.

Each limit is a ``Constraint``: a fixed cost plus every unit's cost as a function of how many groups or channels it
keeps (linear for parameters, FLOPs and memory, counted by ``pruners.width.counting``; interpolated from the
measured table for latency, ``pruners.width.latency``). A candidate's sampled shares are lowered (or raised) by one
common shift, inside the bounds, until every limit holds with the tightest one met (bisection on the shift), then
rounded to whole groups and channels (at least one of each per block) and repaired greedily: units rounded up the
most give back one group or channel while a limit is exceeded, then units rounded down the most take one back
while every limit still holds. The effective allocation is the kept count of every unit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pruners.width.counting import Shapes, flops_per_token, memory_bytes, params
from pruners.width.geometry import BlockWidth, Geometry
from prunesearch.safety import UserError
from search.budget import Budget
from search.settings import BOUND_WIDTH

KINDS = ("attn", "mlp")
UNITS = {"params": "parameters", "flops": "FLOPs per token", "memory": "bytes", "latency": "ms"}


@dataclass(frozen=True)
class Constraint:
    """One limit: ``fixed + sum over units of cost(unit, kept)`` must stay at most ``bound``. Linear costs are
    ``per_unit * kept``; a latency limit interpolates ``points``/``values`` of each unit instead."""

    kind: str
    fixed: float
    bound: float
    dense: float
    per_unit: np.ndarray | None = None
    points: tuple[np.ndarray, ...] = ()
    values: tuple[np.ndarray, ...] = ()

    def cost(self, kept: np.ndarray) -> float:
        """The constrained amount of an allocation (real-valued kept counts interpolate)."""
        return float(self.cost_many(np.asarray(kept, dtype=np.float64)[None])[0])

    def cost_many(self, kept: np.ndarray) -> np.ndarray:
        """The constrained amount of many allocations (rows) at once."""
        kept = np.atleast_2d(np.asarray(kept, dtype=np.float64))
        if self.per_unit is not None:
            return self.fixed + kept @ self.per_unit
        return self.fixed + sum(np.interp(kept[:, i], p, v) for i, (p, v) in enumerate(zip(self.points, self.values)))

    def step(self, i: int, k: int) -> float:
        """What unit ``i`` adds going from ``k`` to ``k + 1`` groups or channels."""
        if self.per_unit is not None:
            return float(self.per_unit[i])
        p, v = self.points[i], self.values[i]
        return float(np.interp(k + 1, p, v) - np.interp(k, p, v))

    def at(self, bound: float) -> Constraint:
        return dataclasses.replace(self, bound=float(bound))

    def describe(self) -> str:
        return f"{self.kind} ≤ {self.bound:,.6g} {UNITS[self.kind]} ({self.bound / self.dense:.1%} of dense)"


@dataclass(frozen=True)
class WidthSpace:
    """Units (``"3.attn"``, ``"3.mlp"``), their dense counts and parameters per group or channel, the budget's
    constraints and the bounds of a sampled kept share."""

    units: tuple[str, ...]
    blocks: tuple[int, ...]
    counts: np.ndarray  # dense key/value groups or MLP channels of each unit
    costs: np.ndarray  # parameters one group (with its query heads) or one channel costs
    fixed: int  # parameters at zero width: embeddings, norms, LM head, output biases
    constraints: tuple[Constraint, ...]
    low: float  # bounds of a sampled kept share
    high: float
    group: int  # query heads per key/value group
    ranged: int | None = None  # index of the constraint a budget range moves (a Pareto search)

    def __post_init__(self):
        least = np.ones(len(self.units), dtype=np.int64)
        for c in self.constraints:
            if c.bound > c.dense * (1 + 1e-9):
                raise UserError(f"budget {c.describe()} exceeds the dense model's {c.dense:,.6g}")
            if not self._holds(c, least):
                raise UserError(f"budget {c.describe()} is infeasible for --space width: keeping one key/value "
                                f"group and one MLP channel per block needs {c.cost(least):,.6g}")

    @property
    def dim(self) -> int:
        return len(self.units)

    @property
    def sizes(self) -> np.ndarray:
        """Parameters of every unit at full width."""
        return self.counts * self.costs

    @property
    def target(self) -> float:
        """The parameter-weighted mean share kept when every unit keeps the same share the budget allows."""
        return float(np.dot(self._real(np.ones(self.dim)), self.costs) / self.sizes.sum())

    def constraint(self, kind: str) -> Constraint | None:
        return next((c for c in self.constraints if c.kind == kind), None)

    def at(self, bound: float) -> WidthSpace:
        """The space whose ranged constraint has ``bound`` (a Pareto trial's own budget)."""
        cons = list(self.constraints)
        cons[self.ranged] = cons[self.ranged].at(bound)
        return dataclasses.replace(self, constraints=tuple(cons))

    def params(self, kept: np.ndarray) -> int:
        """All parameters of the model keeping ``kept`` groups and channels per unit."""
        return int(self.fixed + np.dot(np.asarray(kept, dtype=np.int64), self.costs.astype(np.int64)))

    def amounts(self, kept: np.ndarray) -> dict[str, float]:
        """What every constraint counts of an allocation (parameters, FLOPs per token, bytes, ms)."""
        return {c.kind: c.cost(kept) for c in self.constraints}

    def removed_share(self, kept: np.ndarray) -> float:
        """Share of the units' parameters an allocation removes (the width space's ``budget_sparsity``)."""
        return float(1.0 - np.dot(kept, self.costs) / self.sizes.sum())

    def saved_share(self, kept: np.ndarray) -> float:
        """Share of the ranged constraint's dense amount an allocation saves (a Pareto run's second objective)."""
        c = self.constraints[self.ranged]
        return float(1.0 - c.cost(kept) / c.dense)

    def shares(self, kept: np.ndarray) -> np.ndarray:
        return np.asarray(kept, dtype=np.float64) / self.counts

    @staticmethod
    def _holds(c: Constraint, kept: np.ndarray) -> bool:
        return c.cost(kept) <= c.bound + 1e-9 * abs(c.bound)

    def feasible(self, kept: np.ndarray) -> bool:
        """Whether an allocation meets every limit."""
        return all(self._holds(c, kept) for c in self.constraints)

    def _real(self, x: np.ndarray, grow: bool = True) -> np.ndarray:
        """Real-valued kept counts of shares ``x`` (one row or many) after the common shift that meets every limit,
        bisected for all rows at once; without ``grow`` the shift only lowers shares that break a limit."""
        rows = np.clip(np.atleast_2d(np.asarray(x, dtype=np.float64)), self.low, self.high)

        def real(t: np.ndarray) -> np.ndarray:
            return self.counts * np.clip(rows - t[:, None], self.low, self.high)

        def fits(kept: np.ndarray) -> np.ndarray:
            ok = np.ones(len(kept), dtype=bool)  # a space without limits (--space both's free widths) fits anywhere
            for c in self.constraints:
                ok &= c.cost_many(kept) <= c.bound + 1e-9 * abs(c.bound)
            return ok

        # a shift of -1: every share at the upper bound; 0: as sampled; 1: every share at the lower bound
        start = np.full(len(rows), -1.0 if grow else 0.0)
        lo, hi = start.copy(), np.ones(len(rows))
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            ok = fits(real(mid))
            lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
        out = np.where(fits(real(start))[:, None], real(start), real(hi))
        return out[0] if np.ndim(x) == 1 else out

    def project_many(self, x: np.ndarray) -> np.ndarray:
        """Real-valued kept counts of many sampled share vectors (rows): ``project``'s common shift, without the
        whole-unit rounding (the guided search screens thousands; its predictor reads kept shares, which rounding
        barely moves)."""
        return self._real(np.atleast_2d(x))

    def sampled(self, kept: np.ndarray) -> np.ndarray:
        """The sampled point an allocation corresponds to: the kept share of every unit."""
        return self.shares(kept)

    def project(self, x: np.ndarray, grow: bool = True) -> np.ndarray:
        """The kept counts of sampled shares ``x``: within every limit, whole, at least one per unit, and (with
        ``grow``) with no unit able to keep one more without breaking a limit; without ``grow`` shares that meet
        every limit stay as sampled (rounded)."""
        real = self._real(x, grow)
        kept = np.clip(np.rint(real), 1, self.counts).astype(np.int64)
        while not self.feasible(kept):
            over = [c for c in self.constraints if not self._holds(c, kept)]
            helps = np.array([kept[i] > 1 and any(c.step(i, kept[i] - 1) > 0 for c in over)
                              for i in range(self.dim)])
            if not helps.any():
                raise UserError("no width allocation meets " + "; ".join(c.describe() for c in over))
            kept[int(np.argmax(np.where(helps, kept - real, -np.inf)))] -= 1
        while grow:
            slack = [(c, c.bound - c.cost(kept)) for c in self.constraints]
            fits = np.array([kept[i] < self.counts[i] and all(c.step(i, kept[i]) <= room + 1e-9 * abs(c.bound)
                                                              for c, room in slack) for i in range(self.dim)])
            if not fits.any():
                return kept
            kept[int(np.argmax(np.where(fits, real - kept, -np.inf)))] += 1
        return kept

    def fit(self, make, label: str) -> np.ndarray:
        """The allocation ``make(removed_share)`` (a heuristic such as uniform width) at the smallest removed share
        that meets every limit (bisection over the share)."""
        lo, hi = 0.0, 0.999
        best = self.kept(make(hi))
        if not self.feasible(best):
            raise UserError(f"the {label} seed cannot meet " + "; ".join(c.describe() for c in self.constraints))
        if self.feasible(self.kept(make(lo))):
            return self.kept(make(lo))
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            kept = self.kept(make(mid))
            if self.feasible(kept):
                hi, best = mid, kept
            else:
                lo = mid
        return best

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


def _linear(kind: str, count, geom: Geometry, bound_of, dense: float) -> Constraint:
    """A constraint linear in the kept groups and channels, from ``count(widths)`` of the whole model."""
    n = len(geom.widths)
    zero = [BlockWidth(0, 0, 0)] * n
    fixed = count(zero)
    group = count([BlockWidth(geom.group, 1, 0)] + zero[1:]) - fixed
    channel = count([BlockWidth(0, 0, 1)] + zero[1:]) - fixed
    return Constraint(kind, float(fixed), bound_of(dense), float(dense),
                      per_unit=np.array([group, channel] * n, dtype=np.float64))


def _latency(table, geom: Geometry, bound_of) -> Constraint:
    """The latency constraint of a measured table (costs made non-decreasing: timing noise must not make a wider
    unit look cheaper)."""
    n = len(geom.widths)
    attn = np.maximum.accumulate(np.asarray(table.attention_ms)) - table.block_ms
    mlp = np.maximum.accumulate(np.asarray(table.mlp_ms)) - table.block_ms
    points = (np.asarray(table.groups, dtype=np.float64), np.asarray(table.channels, dtype=np.float64)) * n
    values = (attn, mlp) * n
    dense = float(table.dense_ms)
    return Constraint("latency", dense - float(attn[-1] + mlp[-1]) * n, bound_of(dense), dense, points=points,
                      values=values)


def make_width_space(geom: Geometry, s: Shapes, budget: str, total_params: int, seqlen: int, latency=None
                     ) -> WidthSpace:
    """The width space of a model under ``budget`` (``params=75%``, ``flops=60%,latency=40ms@512``...); sampled
    shares lie within ``BOUND_WIDTH`` of the mean kept share of the budget's ends. ``latency(tokens)`` gives the
    measured ``pruners.width.latency.LatencyTable`` a latency limit needs."""
    parsed = Budget.parse(budget)
    if "sparsity" in parsed.kinds:
        raise UserError(f"--space width needs params=, flops=, memory= or latency= budgets, got {budget!r}")
    dense_widths = list(geom.widths)
    constraints, ranged, ends = [], None, None
    for i, limit in enumerate(parsed.limits):
        tokens = limit.tokens or seqlen
        counters = {"params": lambda w: params(s, w),
                    "flops": lambda w, t=tokens: flops_per_token(s, w, t),
                    "memory": lambda w, t=tokens: memory_bytes(s, w, t)["total"]}
        if limit.kind == "latency":
            if latency is None:
                raise UserError("a latency= budget needs the measured latency table (search --space width)")
            c = _latency(latency(tokens), geom, lambda d, lim=limit: lim.resolve(d)[1])
        else:
            count = counters[limit.kind]
            c = _linear(limit.kind, count, geom, lambda d, lim=limit: lim.resolve(d)[1], float(count(dense_widths)))
        if limit.ranged:
            ranged, ends = i, limit.resolve(c.dense)
        constraints.append(c)
    units = tuple(f"{i}.{k}" for i in range(len(geom.widths)) for k in KINDS)
    blocks = tuple(i for i in range(len(geom.widths)) for _ in KINDS)
    counts = np.array([n for w in geom.widths for n in (w.kv_heads, w.intermediate)], dtype=np.int64)
    unit_params = np.array([s.group_params(), s.channel_params()] * len(geom.widths), dtype=np.int64)
    fixed = s.other_params + sum(s.block_params(BlockWidth(0, 0, 0)) for _ in geom.widths)
    space = WidthSpace(units, blocks, counts, unit_params, fixed, tuple(constraints), 0.0, 1.0, geom.group, ranged)
    tight = space.at(ends[0]) if ranged is not None else space
    t_low, t_high = tight.target, space.target
    return dataclasses.replace(space, low=max(t_low - BOUND_WIDTH, min(t_low, 0.01)),
                               high=min(1.0, t_high + BOUND_WIDTH))
