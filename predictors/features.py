"""Features of a per-layer allocation, defined over *relative* depth so one predictor serves models of any depth.

The facts about a run's search space that features need (unit sizes, blocks, attention/MLP weight counts, OWL
outlier ratios, budget) are a ``SpaceRecord``, written as ``space.json`` into every run folder (a width run's are
a ``predictors.width_features.WidthRecord``, with features of its own). The feature
layout is a plain dict (the *spec*) saved with each predictor; features of a model with another number of blocks
are the same columns because every per-block profile is resampled to ``depth_bins`` equal bins of depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError

SPEC_VERSION = 1


@dataclass(frozen=True)
class SpaceRecord:
    """What the features need to know about a run's space, in JSON-friendly form."""

    units: tuple[str, ...]
    blocks: tuple[int, ...]  # block of each unit
    sizes: tuple[float, ...]  # weights per unit
    attention_sizes: tuple[float, ...]  # attention weights per unit (the rest are MLP weights)
    num_blocks: int
    target: float | None  # None for a budget range: each allocation's own mean sparsity is its target
    low: float
    high: float
    outlier_ratio: tuple[float, ...]  # OWL outlier ratio (%) per block, from the dense Wanda statistics
    model: str
    budget: str
    granularity: str
    fitness_kind: str
    space: str = "sparsity"

    @property
    def columns(self) -> list[str]:
        """The trials table's columns holding an allocation (each unit's effective sparsity)."""
        return [f"s[{u}]" for u in self.units]

    @property
    def budget_kind(self) -> str:
        return self.budget.partition("=")[0]

    @classmethod
    def from_workspace(cls, ws) -> SpaceRecord:
        """The record of a ``search.workspace.Workspace``."""
        sp = ws.space
        attention = [sum(ws.lay.numel(n) for n in members if ws.lay.kind_of(n) == "attention")
                     for members in sp.members]
        s = ws.settings
        return cls(tuple(sp.units), tuple(int(b) for b in sp.blocks), tuple(float(v) for v in sp.sizes),
                   tuple(float(v) for v in attention), ws.lay.num_blocks,
                   None if ws.multi else float(sp.target), float(sp.low),
                   float(sp.high), tuple(float(v) for v in ws.scores.outlier_ratio), ws.source, s.budget,
                   s.granularity, s.fitness)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpaceRecord:
        if d.get("space", "sparsity") != "sparsity":
            raise UserError(f"a {d['space']} run's space.json is not a sparsity space record (load_record reads both)")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)

    def save(self, path: Path) -> None:
        atomic_json(Path(path), self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: Path) -> SpaceRecord:
        return cls.from_dict(read_json(path, "search space record"))


def load_record(path: Path):
    """A run's ``space.json``: a ``SpaceRecord`` for a sparsity run, a ``predictors.width_features.WidthRecord`` (or
    ``BothRecord``) for a width (or ``--space both``) run."""
    d = read_json(Path(path), "search space record")
    if isinstance(d, dict) and d.get("space", "sparsity") != "sparsity":
        from predictors.width_features import WidthRecord

        return WidthRecord.load(path)
    return SpaceRecord.from_dict(d)


def make_spec(depth_bins: int = 8, space: str = "sparsity") -> dict:
    """The feature spec of a search space (``sparsity`` or ``width``): version, depth bins and column names."""
    if depth_bins < 2:
        raise UserError(f"depth_bins must be at least 2, got {depth_bins}")
    if space == "width":
        from predictors.width_features import make_width_spec

        return make_width_spec(depth_bins)
    if space != "sparsity":
        raise UserError(f"the accuracy predictor has features for sparsity and for width allocations, not {space!r} "
                        "(--space both needs --predictor off)")
    bins = range(depth_bins)
    names = ([f"depth[{b}]" for b in bins] + [f"attn_minus_mlp[{b}]" for b in bins]
             + [f"outliers[{b}]" for b in bins]
             + ["mean", "std", "slope", "curvature", "min", "max", "first", "last", "attention_mean", "mlp_mean",
                "attention_share", "target_sparsity", "owl_covariance", "owl_weighted"])
    return {"version": SPEC_VERSION, "depth_bins": depth_bins, "names": names}


def check_spec(spec: dict, expected: dict) -> None:
    """Refuse features built under one spec for a predictor trained under another."""
    if spec.get("space", "sparsity") != expected.get("space", "sparsity"):
        raise UserError(f"the predictor was trained on features of {expected.get('space', 'sparsity')} allocations; "
                        f"these are {spec.get('space', 'sparsity')} allocations")
    if spec != expected:
        diff = sorted(k for k in set(spec) | set(expected) if spec.get(k) != expected.get(k))
        raise UserError(f"feature spec mismatch (differs in {', '.join(diff)}): the predictor was trained on "
                        f"features {expected.get('version')}/{expected.get('depth_bins')} bins, these are "
                        f"{spec.get('version')}/{spec.get('depth_bins')} bins")


def depth_weights(num_blocks: int, depth_bins: int) -> np.ndarray:
    """(bins × blocks) overlap weights: block i covers depths [i/n, (i+1)/n), bin b covers [b/B, (b+1)/B);
    each row sums to one, so a constant profile resamples to the same constant."""
    edges_blocks = np.arange(num_blocks + 1) / num_blocks
    edges_bins = np.arange(depth_bins + 1) / depth_bins
    lo = np.maximum(edges_bins[:-1, None], edges_blocks[None, :-1])
    hi = np.minimum(edges_bins[1:, None], edges_blocks[None, 1:])
    w = np.clip(hi - lo, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def trend(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, curvature) of every row of a per-block profile (n × blocks) over relative depth: least-squares
    coefficients of depth and centred depth²; two blocks give their difference as the slope."""
    nb = profile.shape[1]
    depth = (np.arange(nb) + 0.5) / nb - 0.5
    if nb < 3:
        return (profile[:, -1] - profile[:, 0]) * (nb - 1), np.zeros(len(profile))
    basis = np.stack([np.ones(nb), depth, depth ** 2 - np.mean(depth ** 2)], axis=1)
    coef = np.linalg.lstsq(basis, profile.T, rcond=None)[0].T
    return coef[:, 1], coef[:, 2]


def _per_block(values: np.ndarray, weights: np.ndarray, blocks: np.ndarray, num_blocks: int) -> np.ndarray:
    """Weight-averaged value of every block, for each row of ``values`` (n × units) → (n × blocks)."""
    onehot = np.zeros((len(blocks), num_blocks))
    onehot[np.arange(len(blocks)), blocks] = weights
    total = onehot.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (values @ onehot) / total
    return np.where(total > 0, out, np.nan)


def features(allocs: np.ndarray, rec: SpaceRecord, spec: dict) -> np.ndarray:
    """Feature matrix (n × len(spec['names'])) of allocations (n × units: effective sparsities, or kept groups and
    channels under a width spec)."""
    if spec.get("space", "sparsity") != rec.space:
        raise UserError(f"a {rec.space} run's allocations do not have the features of {spec.get('space', 'sparsity')} "
                        "allocations this predictor uses")
    if spec.get("space") == "width":
        from predictors.width_features import width_features

        return width_features(allocs, rec, spec)
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"feature spec version {spec.get('version')} is not supported (this is {SPEC_VERSION})")
    a = np.atleast_2d(np.asarray(allocs, dtype=np.float64))
    if a.shape[1] != len(rec.units):
        raise ValueError(f"allocations have {a.shape[1]} values, the space has {len(rec.units)} units")
    nb, bins = rec.num_blocks, spec["depth_bins"]
    blocks = np.asarray(rec.blocks)
    sizes = np.asarray(rec.sizes)
    attn = np.asarray(rec.attention_sizes)
    mlp = sizes - attn
    block = _per_block(a, sizes, blocks, nb)
    block_attn = _per_block(a, attn, blocks, nb)
    block_mlp = _per_block(a, mlp, blocks, nb)
    gap = np.nan_to_num(block_attn - block_mlp)
    w = depth_weights(nb, bins)
    outliers = np.asarray(rec.outlier_ratio, dtype=np.float64)
    norm = outliers / outliers.mean() if outliers.mean() > 0 else np.ones(nb)
    slope, curvature = trend(block)
    pruned = a @ sizes
    attn_pruned = a @ attn
    cols = [
        block @ w.T, gap @ w.T, np.broadcast_to(norm @ w.T, (len(a), bins)),
        np.stack([
            pruned / sizes.sum(), block.std(axis=1), slope, curvature, block.min(axis=1), block.max(axis=1),
            block[:, 0], block[:, -1], attn_pruned / attn.sum() if attn.sum() > 0 else np.zeros(len(a)),
            (a @ mlp) / mlp.sum() if mlp.sum() > 0 else np.zeros(len(a)),
            np.divide(attn_pruned, pruned, out=np.zeros(len(a)), where=pruned > 0),
            pruned / sizes.sum() if rec.target is None else np.full(len(a), rec.target),
            ((block - block.mean(axis=1, keepdims=True)) * (norm - 1)).mean(axis=1),
            (block * norm).mean(axis=1),
        ], axis=1),
    ]
    out = np.concatenate(cols, axis=1)
    if out.shape[1] != len(spec["names"]):
        raise ValueError(f"feature spec lists {len(spec['names'])} names, the features have {out.shape[1]}")
    return out
