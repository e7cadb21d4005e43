"""What the predictor-guided search screens, and how it narrows and picks (``search.guided``): box points of the
current per-unit bounds, smooth depth profiles and small moves of the best allocations; the narrowed bounds; the
distinct best of the screened. Pure functions of a space (sparsity or width: ``project_many`` and ``sampled``)."""

from __future__ import annotations

import numpy as np

from search.samplers import depth_waves, drop_block, drop_share, kind_groups, mutate, smooth_profiles


def smooth_share(space) -> float:
    """1 − blocks/units: none at block granularity, 6/7 for the seven projections of a LLaMA block, 1/2 for width.
    That share of the narrowing screen is drawn as smooth depth profiles (the features see per-block depth bins,
    which average jagged box points down to near-flat profiles), and that share of the rest of the screen becomes
    evolution children of the best allocations (``local``): in hundreds of dimensions a few dozen pairs cannot
    steer box samples, but they rank small moves of the incumbent."""
    return 1.0 - len(set(space.blocks)) / space.dim


def box(space, rng: np.random.Generator, low: np.ndarray, high: np.ndarray, n: int, smooth: int) -> np.ndarray:
    """``n`` allocations of random points of the per-unit bounds, ``smooth`` of them smooth depth profiles."""
    return space.project_many(np.concatenate([rng.uniform(low, high, size=(n - smooth, space.dim)),
                                              smooth_profiles(space, rng, smooth, low, high)]))


def local(space, rng: np.random.Generator, best: np.ndarray, low: np.ndarray, high: np.ndarray, n: int,
          evolve: bool = False) -> np.ndarray:
    """``n`` on-budget perturbations of the best measured allocations (given as sampled points): half per unit
    (σ = a tenth of each unit's bounds), half smooth along depth (``depth_waves``, amplitude a tenth of the mean
    bound width), a ``drop_share`` of them block drops (``drop_block``); with ``evolve`` the budget-neutral
    evolution's moves instead (``samplers.mutate``: a block drop, a depth wave or a few level switches), so the
    predictor screens thousands of children where the evolution would measure them one by one."""
    if n == 0:
        return np.empty((0, space.dim))
    centres = best[rng.integers(0, len(best), n)]
    if evolve:
        kinds = kind_groups(space)
        children = np.stack([mutate(space, rng, c, low=low, high=high, kinds=kinds) for c in centres])
        return space.project_many(np.clip(children, low, high))
    noise = rng.normal(size=centres.shape) * 0.1 * (high - low)
    waves = depth_waves(space, rng, n, 0.1 * float(np.mean(high - low)))
    smooth = np.arange(n) % 2 == 1
    children = centres + np.where(smooth[:, None], waves, noise)
    share = drop_share(space)
    for i in np.nonzero(rng.random(n) < share)[0] if share else ():
        children[i] = drop_block(space, rng, centres[i], high)
    return space.project_many(np.clip(children, low, high))


def narrow(space, allocs: np.ndarray, predicted: np.ndarray, incumbent: np.ndarray,
           quantile: float = 0.1, insensitive: float = 0.25, margin: float = 0.1, min_width: float = 0.02,
           spread: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New per-unit bounds (low, high): the ``spread``…1−``spread`` percentiles of the predicted best ``quantile``
    of screened allocations, padded by ``margin`` of their width; plus each unit's sensitivity (|Spearman ρ|
    between its sparsity and the prediction). Never excludes ``incumbent``."""
    from scipy.stats import rankdata

    k = max(2, int(np.ceil(quantile * len(predicted))))
    top = allocs[np.argsort(predicted, kind="stable")[:k]]
    low, high = np.quantile(top, spread, axis=0), np.quantile(top, 1.0 - spread, axis=0)
    pad = margin * (high - low)
    low, high = low - pad, high + pad
    short = (high - low) < min_width
    mid = 0.5 * (low + high)
    low = np.where(short, mid - min_width / 2, low)
    high = np.where(short, mid + min_width / 2, high)
    rp = rankdata(predicted)
    ra = np.apply_along_axis(rankdata, 0, allocs)
    rp, ra = rp - rp.mean(), ra - ra.mean(axis=0)
    denom = np.sqrt((ra ** 2).sum(axis=0) * (rp ** 2).sum())
    sens = np.abs(np.divide(ra.T @ rp, denom, out=np.zeros(allocs.shape[1]), where=denom > 0))
    flat = sens < insensitive * sens.max() if sens.max() > 0 else np.ones_like(sens, dtype=bool)
    low = np.where(flat, space.low, low)
    high = np.where(flat, space.high, high)
    low = np.clip(np.minimum(low, incumbent), space.low, space.high)
    high = np.clip(np.maximum(high, incumbent), space.low, space.high)
    return low, high, sens


def distinct_best(allocs: np.ndarray, score: np.ndarray, n: int, radius: float) -> list[int]:
    """The ``n`` lowest-scoring rows, skipping any within ``radius`` (max-norm) of one already chosen: tree
    ensembles are piecewise constant, so the best scores often tie on near-copies of one allocation."""
    chosen: list[int] = []
    for i in np.argsort(score, kind="stable"):
        if len(chosen) == n:
            break
        if all(np.max(np.abs(allocs[i] - allocs[j])) >= radius for j in chosen):
            chosen.append(int(i))
    return chosen
