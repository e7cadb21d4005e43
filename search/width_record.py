"""What a width run records about its space in ``space.json`` (the file a sparsity run writes its
``predictors.features.SpaceRecord`` to): units, dense counts, parameters per key/value group or MLP channel and the
budget, so that reading a run's trials (report, plots) needs neither the model nor the search's code."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError


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
