"""Optuna samplers for allocation search, including a budget-neutral evolutionary one."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from prunesearch.safety import UserError
from search.space import Space


def param_name(unit: str) -> str:
    """The Optuna parameter that holds a unit's sampled sparsity."""
    return f"x[{unit}]"


SCAN = "drop-scan"  # the drop scan's ``guide``: drop-scan/block-K, /top-K, /run-A-B, /pair-A-B+C-D


def trial_label(trial, sampler: str) -> str:
    """Who proposed a trial: its heuristic seed's label, the block-drop scan's name (``drop-scan/top-2``,
    ``search.drops``), else the run's sampler."""
    guide = str(trial.user_attrs.get("guide", ""))
    return trial.user_attrs.get("seed") or (guide if guide.startswith(SCAN + "/") else sampler)


def allocation_key(alloc) -> tuple[float, ...]:
    """An allocation rounded to 1e-9, so equal allocations compare equal despite float noise."""
    return tuple(np.round(np.asarray(alloc, dtype=np.float64), 9).tolist())


def depth_waves(space: Space, rng: np.random.Generator, n: int, amplitude: float, harmonics: int = 3
                ) -> np.ndarray:
    """``n`` smooth perturbations of an allocation along depth: sums of the first ``harmonics`` cosines over the
    block index with normal amplitudes (``amplitude`` / k for the k-th), one value per unit (all units of a block
    move together).

    On a real model the best allocations are smooth in depth (SmolLM2 at 70%: a concave rise from ~0.4 to ~0.9),
    and per-unit moves reach such a shape only after many steps; one wave tilts or bends the whole profile.
    """
    depth = np.asarray(space.blocks, dtype=np.float64) / max(max(space.blocks), 1)
    k = np.arange(1, harmonics + 1)
    basis = np.cos(np.pi * k[:, None] * depth[None, :])  # harmonics x units
    coef = rng.normal(size=(n, harmonics)) * amplitude / k
    return coef @ basis


def smooth_profiles(space: Space, rng: np.random.Generator, n: int, low: np.ndarray, high: np.ndarray,
                    knots: int = 5, jitter: float = 0.1) -> np.ndarray:
    """``n`` random points of the per-unit box [``low``, ``high``] shaped like a depth profile: each unit's place
    in its own range is a random piecewise-linear curve over depth (``knots`` uniform values at evenly spaced
    depths) plus normal per-unit ``jitter`` (clipped to the box; not yet on the budget).

    With several units per block (projection granularity), uniform box points are jagged and their block means
    all sit near the box centre, so a screen of them never proposes the steep smooth profiles real models want;
    these cover that low-dimensional family of shapes inside the same box.
    """
    depth = np.asarray(space.blocks, dtype=np.float64) / max(max(space.blocks), 1)
    grid = np.linspace(0.0, 1.0, knots)
    curves = np.stack([np.interp(depth, grid, row) for row in rng.uniform(size=(n, knots))]) if n else \
        np.empty((0, space.dim))
    place = np.clip(curves + rng.normal(scale=jitter, size=curves.shape), 0.0, 1.0)
    return low + place * (high - low)


def kind_groups(space) -> list[np.ndarray]:
    """Unit indices of each projection kind (``q_proj``, ``down_proj``, ...) of a projection-level space, one unit
    per block each; empty for a block-level space. On SmolLM2-135M at 70%, pruning every block's q/k projections
    one level more and v/o one level less lowered the KL of the block-level answer by 0.05 nats."""
    kinds: dict[str, list[int]] = {}
    for i, kind in enumerate(getattr(space, "kinds", ())):
        kinds.setdefault(kind, []).append(i)
    groups = [np.array(v) for v in kinds.values()]
    return groups if len(groups) > 1 and len({len(g) for g in groups}) == 1 else []


DROP = 0.1  # share of children that are block drops, in sparsity spaces


def drop_share(space) -> float:
    """How often a child is a block drop: ``DROP`` in a sparsity space; never in width spaces, whose values are
    kept shares (removing a block there is the width search's own business)."""
    return DROP if isinstance(space, Space) else 0.0


def drop_blocks(space: Space, parent: np.ndarray, blocks, high) -> np.ndarray:
    """``parent`` with every unit of the given ``blocks`` at the top of its range (``high``) and the weights this
    frees spread evenly over the other units, so the budget holds (a later projection changes nothing unless that
    shift crosses a bound)."""
    child = np.array(parent, dtype=np.float64)
    chosen = np.isin(np.asarray(space.blocks), list(blocks))
    child[chosen] = np.broadcast_to(high, child.shape)[chosen]
    w = space.sizes / space.sizes.sum()
    child[~chosen] += (space.target - child @ w) / w[~chosen].sum()
    return child


def drop_block(space: Space, rng: np.random.Generator, parent: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A child with one random block dropped (``drop_blocks``). On SmolLM2-135M at 70%, nearly removing block 14
    or 15 of ATP 0.3 this way lowered its KL by 0.07 nats: one move, which per-unit switches and depth waves reach
    only by chance (``results/benchmarks/block_drops-smollm2-wanda-70.md``)."""
    return drop_blocks(space, parent, [rng.choice(np.unique(space.blocks))], high)


def mutate(space, rng: np.random.Generator, parent: np.ndarray, step: float = 0.02, max_moves: int = 3,
           wave: float = 0.5, wave_amplitude: float = 0.05, low=None, high=None,
           kinds: list[np.ndarray] | None = None) -> np.ndarray:
    """One child of a sampled point: with probability ``drop_share`` a block drop (``drop_block``, on the budget);
    else with probability ``wave`` one depth wave (off the budget: project it) — or, in
    a projection-level space, half the time a kind shift: one kind of projection a level up in every block and
    another a level down, the same weights moved (``kind_groups``) — else 1 to ``max_moves`` level switches
    between random pairs of units inside the bounds (default the space's), each moving ``step`` × the mean unit
    size of weights from one unit to the other, so the budget is kept. ``kinds``: ``kind_groups(space)``, for a
    caller that draws many children of one space."""
    child = np.array(parent, dtype=np.float64)
    delta = step * space.sizes.mean() / space.sizes
    lo = np.broadcast_to(space.low if low is None else low, child.shape)
    hi = np.broadcast_to(space.high if high is None else high, child.shape)
    share = drop_share(space)
    if share and rng.random() < share:
        return drop_block(space, rng, child, hi)
    if rng.random() < wave:
        groups = kind_groups(space) if kinds is None else kinds
        if groups and rng.random() < 0.5:
            up, down = rng.choice(len(groups), size=2, replace=False)
            child[groups[up]] += delta[groups[up]]
            child[groups[down]] -= delta[groups[down]]
            return child
        return parent + depth_waves(space, rng, 1, wave_amplitude)[0]
    for _ in range(rng.integers(1, max_moves + 1)):
        for _attempt in range(20):
            a, b = rng.choice(space.dim, size=2, replace=False)
            if child[a] + delta[a] <= hi[a] and child[b] - delta[b] >= lo[b]:
                child[a] += delta[a]
                child[b] -= delta[b]
                break
    return child


class BudgetNeutralEvolution(optuna.samplers.BaseSampler):
    """(1+λ) evolution whose mutations keep the budget: EvoPress's level switch made continuous, plus smooth moves.

    Each child starts from the best completed allocation. A tenth are block drops (``drop_block``: one block at
    the top of its range, the weights it frees spread evenly over the others). Of the rest, with probability
    ``wave`` a child is bent by one depth wave (``depth_waves``, amplitude ``wave_amplitude``) and projected back
    onto the budget; else it gets 1-3 level switches: a switch prunes ``step`` × the mean unit size more weights
    in one unit and as many fewer in another (one level of the equal-nonzero grid, ``Space.level_steps``), so the
    child meets the budget exactly without projection. A child that was measured already is redrawn (up to 20 times).
    """

    def __init__(self, space: Space, step: float = 0.02, max_moves: int = 3, seed: int | None = None,
                 wave: float = 0.5, wave_amplitude: float = 0.05):
        self.space, self.step, self.max_moves = space, step, max_moves
        self.wave, self.wave_amplitude = wave, wave_amplitude
        self.rng = np.random.default_rng(seed)
        self.kinds = kind_groups(space)
        self.fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self.rng = np.random.default_rng()
        self.fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial):
        return {param_name(u): FloatDistribution(self.space.low, self.space.high) for u in self.space.units}

    def sample_relative(self, study, trial, search_space):
        measured = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                    if "allocation" in t.user_attrs]
        done = [t for t in measured if t.state == TrialState.COMPLETE]
        if not done:
            return {}
        best = np.asarray(min(done, key=lambda t: t.value).user_attrs["allocation"], dtype=np.float64)
        seen = {allocation_key(t.user_attrs["allocation"]) for t in measured}
        for _child in range(20):  # a child that was measured already is redrawn
            child = self._mutate(best)
            if allocation_key(child) not in seen:
                break
        return {param_name(u): float(v) for u, v in zip(self.space.units, child)}

    def _mutate(self, parent: np.ndarray) -> np.ndarray:
        return self.space.project(mutate(self.space, self.rng, parent, self.step, self.max_moves, self.wave,
                                         self.wave_amplitude, kinds=self.kinds))

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.fallback.sample_independent(study, trial, param_name, param_distribution)


def make_sampler(name: str, space: Space, seed: int, step: float = 0.02) -> optuna.samplers.BaseSampler:
    """``tpe`` (multivariate), ``qmc`` (scrambled Sobol), ``nsga2``, ``evo`` (budget-neutral evolution, moving
    ``step`` × the mean unit size of weights per move)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=10)
    if name == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "evo":
        return BudgetNeutralEvolution(space, step=step, seed=seed)
    raise UserError(f"unknown sampler {name!r}; choose tpe, qmc, nsga2 or evo")
