"""What a width run records about its space in ``space.json`` (the file a sparsity run writes its
``predictors.features.SpaceRecord`` to): units, dense counts, parameters per key/value group or MLP channel and the
budget, so that reading a run's trials (report, plots, the predictor's pairs) needs neither the model nor the
search's code; and the accuracy predictor's features of a width allocation.

Width features follow the sparsity features' idea: profiles over *relative* depth, resampled to equal depth bins,
so one predictor serves models of any depth: the kept share of key/value groups and of MLP channels per bin, plus
whole-model summaries (kept parameters, means, minima, first and last blocks, the depth trend of kept parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from predictors.features import depth_weights, trend
from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError

WIDTH_SPEC_VERSION = 1


@dataclass(frozen=True)
class WidthRecord:
    """A width run's space: ``w[unit]`` in its trials counts the groups or channels a unit keeps."""

    units: tuple[str, ...]  # "3.attn" (key/value groups with their query heads) and "3.mlp" (MLP channels)
    blocks: tuple[int, ...]  # block of each unit
    counts: tuple[int, ...]  # dense key/value groups or MLP channels of each unit
    costs: tuple[int, ...]  # parameters one group (with its query heads) or one channel costs
    group: int  # query heads per key/value group
    fixed: int  # parameters at zero width: embeddings, norms, LM head, output biases
    dense_params: int
    budget: str  # as given, e.g. params=75%
    budget_params: int | None  # the most parameters a candidate may have (None: no params= limit)
    limits: tuple[str, ...]  # every limit, resolved (e.g. "flops ≤ 1.2e+08 FLOPs per token (60.0% of dense)")
    low: float  # bounds of a sampled kept share
    high: float
    model: str
    fitness_kind: str
    width_score: str
    space: str = "width"

    @classmethod
    def from_workspace(cls, ws) -> WidthRecord:
        """The record of a ``search.width_workspace.WidthWorkspace``."""
        sp, s = ws.space, ws.settings
        return cls(tuple(sp.units), tuple(int(b) for b in sp.blocks), tuple(int(n) for n in sp.counts),
                   tuple(int(c) for c in sp.costs), int(sp.group), int(sp.fixed), sp.params(sp.counts), s.budget,
                   None if sp.constraint("params") is None else int(sp.constraint("params").bound),
                   tuple(c.describe() for c in sp.constraints), float(sp.low), float(sp.high), ws.source, s.fitness,
                   s.width_score)

    @property
    def columns(self) -> list[str]:
        """The trials table's columns holding an allocation (kept groups or channels of every unit)."""
        return [f"w[{u}]" for u in self.units]

    def shares(self, kept) -> np.ndarray:
        """The kept share of every unit under an allocation (kept counts per unit)."""
        return np.asarray(kept, dtype=np.float64) / np.asarray(self.counts, dtype=np.float64)

    def save(self, path: Path) -> None:
        atomic_json(Path(path), asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> WidthRecord:
        """Read a record (a ``--space both`` run's as its ``BothRecord``)."""
        d = read_json(Path(path), "width space record")
        if isinstance(d, dict) and d.get("space") == "both":
            cls = BothRecord
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as e:
            raise UserError(f"{path} is not a width space record ({e})") from None


@dataclass(frozen=True)
class BothRecord(WidthRecord):
    """A ``--space both`` run's space: the width units' record, plus ``s[block]`` in its trials, the unstructured
    sparsity of each block's kept projection weights (``budget_params`` counts nonzero parameters)."""

    sparsity_units: tuple[str, ...] = ()  # "3.sparsity"
    sparsity_low: float = 0.0  # bounds of a sampled sparsity
    sparsity_high: float = 0.99
    pruner: str = "wanda"
    space: str = "both"

    @classmethod
    def from_workspace(cls, ws) -> BothRecord:
        """The record of a ``search.both_workspace.BothWorkspace``."""
        from types import SimpleNamespace

        sp = ws.space
        base = WidthRecord.from_workspace(SimpleNamespace(space=sp.width, settings=ws.settings, source=ws.source))
        return cls(**{**asdict(base), "sparsity_units": sp.units[sp.width.dim:], "sparsity_low": sp.s_low,
                      "sparsity_high": sp.s_high, "pruner": ws.settings.pruner, "space": "both"})


def make_width_spec(depth_bins: int = 8) -> dict:
    """The feature spec of width allocations (``predictors.features.make_spec(bins, "width")``)."""
    bins = range(depth_bins)
    names = ([f"attn_kept[{b}]" for b in bins] + [f"mlp_kept[{b}]" for b in bins]
             + ["kept_params", "attn_mean", "mlp_mean", "attn_min", "mlp_min", "attn_first", "mlp_first",
                "attn_last", "mlp_last", "kept_std", "kept_slope", "kept_curvature", "attention_share"])
    return {"version": WIDTH_SPEC_VERSION, "space": "width", "depth_bins": depth_bins, "names": names}


def width_features(kept: np.ndarray, rec: WidthRecord, spec: dict) -> np.ndarray:
    """Feature matrix (n × len(spec['names'])) of width allocations (n × units: kept groups or channels, whole or,
    when screening, real-valued)."""
    if spec.get("version") != WIDTH_SPEC_VERSION:
        raise ValueError(f"width feature spec version {spec.get('version')} is not supported "
                         f"(this is {WIDTH_SPEC_VERSION})")
    k = np.atleast_2d(np.asarray(kept, dtype=np.float64))
    if k.shape[1] != len(rec.units):
        raise ValueError(f"allocations have {k.shape[1]} values, the space has {len(rec.units)} units")
    counts, costs = np.asarray(rec.counts, dtype=np.float64), np.asarray(rec.costs, dtype=np.float64)
    blocks = np.asarray(rec.blocks)
    attn = np.array([u.endswith(".attn") for u in rec.units])
    nb = int(blocks.max()) + 1
    share = k / counts
    a_share, m_share = share[:, attn], share[:, ~attn]  # one of each per block, in block order
    kept_params = (k * costs) @ np.eye(nb)[blocks] / ((counts * costs) @ np.eye(nb)[blocks])
    w = depth_weights(nb, spec["depth_bins"]).T
    slope, curvature = trend(kept_params)
    attn_params = (k[:, attn] * costs[attn]).sum(axis=1)
    total = k @ costs
    summary = np.stack([
        total / (counts @ costs), a_share.mean(axis=1), m_share.mean(axis=1), a_share.min(axis=1),
        m_share.min(axis=1), a_share[:, 0], m_share[:, 0], a_share[:, -1], m_share[:, -1], kept_params.std(axis=1),
        slope, curvature, np.divide(attn_params, total, out=np.zeros(len(k)), where=total > 0)], axis=1)
    out = np.concatenate([a_share @ w, m_share @ w, summary], axis=1)
    if out.shape[1] != len(spec["names"]):
        raise ValueError(f"width feature spec lists {len(spec['names'])} names, the features have {out.shape[1]}")
    return out
