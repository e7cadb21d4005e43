"""What one widths-and-sparsity search process holds (``BothWorkspace``): the width workspace's model, importance and
fitness, the dense model's cached Wanda ranks, the space of ``search.both_space`` and candidates realized by
masking (``search.both_realizer``)."""

from __future__ import annotations

import numpy as np
import optuna
import torch

from pruners.width.counting import shapes
from pruners.width.geometry import geometry
from search.both_realizer import BothRealizer
from search.both_space import make_both_space
from search.budget import Budget
from search.samplers import param_name
from predictors.width_features import BothRecord
from search.width_workspace import WidthWorkspace


class BothWorkspace(WidthWorkspace):
    """A workspace whose allocation is, per block, the kept key/value groups and MLP channels and the unstructured
    sparsity of the kept projection weights; the budget counts nonzero parameters."""

    def _prepare_space(self, device: str, batch_size: int) -> None:
        """The space under the budget (refused if infeasible, before any cache is written)."""
        self.geom = geometry(self.model)
        self.shapes = shapes(self.model, self.geom)
        self.m = 0
        prunable = sum(self.lay.numel(n) for n in self.lay.projection_names())
        self.space = make_both_space(self.geom, self.shapes, self.settings.budget, self.total_params, self.seqlen,
                                     prunable, self._latency_table)
        self.budget_kind = "+".join(c.kind for c in self.space.width.constraints)
        w = self.space.width
        self.multi = w.ranged is not None
        if self.multi:  # a Pareto run: trials draw the share of the dense model's parameters saved (nonzero)
            dense = w.constraints[w.ranged].dense
            ends = Budget.parse(self.settings.budget).ranged.resolve(dense)
            self.target_range = tuple(sorted(1.0 - e / dense for e in ends))
        else:
            self.target_range = (float((w.params(w.counts) - self.space.budget) / (w.params(w.counts) - w.fixed)),) * 2

    def _prepare_realizer(self, device: str, batch_size: int) -> None:
        """Head and channel importance and Wanda ranks of the dense model (both cached), the seeds, the realizer."""
        self.importance = self._importance(device, batch_size)
        self.scores = self._score_cache(device, batch_size)
        ends = set(self.target_range) if self.multi else {None}
        self.space = self.space.widened({f"{label}@{t}": x for t in ends for label, x in self.seeds(t).items()})
        self.realizer = BothRealizer(self.geom, self.importance, self.scores)

    def space_at(self, target: float | None):
        """The space whose budget saves the share ``target`` of the dense model's parameters (a Pareto trial's own
        budget); the run's space for None."""
        if target is None:
            return self.space
        w = self.space.width
        return self.space.at(w.constraints[w.ranged].dense * (1.0 - target))

    def suggest(self, trial: optuna.Trial) -> np.ndarray:
        """Kept shares of the width units, sparsities of the blocks, each inside its own bounds."""
        sp = self.space
        return np.array([trial.suggest_float(param_name(u), float(lo), float(hi))
                         for u, lo, hi in zip(sp.units, sp.low, sp.high)])

    def allocation(self, x: np.ndarray, target: float | None = None) -> np.ndarray:
        """Kept groups and channels within the width limits, then sparsities putting the nonzero count on the
        budget (``search.both_space``)."""
        return self.space_at(target).project(x)

    def nonzero_params(self, alloc: np.ndarray) -> int:
        return self.space.nonzero(alloc)

    def realize(self, alloc: np.ndarray) -> None:
        self.realizer.apply(self.space.widths(alloc), self.space.split(alloc)[1].tolist())

    def seeds(self, target: float | None = None) -> dict[str, np.ndarray]:
        """Pure sparsity, pure width (uniform and FLAP) and FLAP at half the removal plus sparsity, as sampled
        values (``BothSpace.seeds``)."""
        return self.space_at(target).seeds(self._seed_makers())

    @property
    def trade_label(self) -> str:
        return "share of dense parameters saved (nonzero)" if self.multi else ""

    def budget_attrs(self, alloc: np.ndarray) -> dict:
        """The removed share of the units' parameters (sliced or pruned), the sliced model's parameters and what
        every width limit counts."""
        kept = self.space.split(alloc)[0]
        amounts = {k: v for k, v in self.space.width.amounts(kept).items() if k != "params"}
        w = self.space.width
        share = (1.0 - self.space.nonzero(alloc) / w.constraints[w.ranged].dense if self.multi
                 else self.space.removed_share(alloc))
        return {"budget_sparsity": share, "sliced_params": w.params(kept), **amounts}

    def budget_columns(self, t) -> dict:
        return {k: t.user_attrs.get(k) for k in ["sliced_params"] + [c.kind for c in self.space.width.constraints
                                                                    if c.kind != "params"]}

    def unit_values(self, alloc: np.ndarray) -> dict[str, float]:
        """Kept share of every width unit and sparsity of every block."""
        kept, s = self.space.split(alloc)
        values = self.space.width.shares(kept).tolist() + s.tolist()
        return {u: float(v) for u, v in zip(self.space.units, values)}

    def unit_columns(self, alloc: list | None) -> dict:
        """``w[unit]``: kept groups or channels; ``s[block]``: sparsity of the block's kept weights."""
        kept, s = self.space.split(alloc) if alloc else (None, None)
        out = {f"w[{u}]": int(kept[i]) if alloc else None for i, u in enumerate(self.space.width.units)}
        return out | {f"s[{b}]": float(s[b]) if alloc else None for b in range(self.space.blocks_n)}

    def config(self, alloc: np.ndarray, meta: dict) -> dict:
        """The ``width`` section and per-block ``sparsity`` targets, with the search's protocol."""
        kept = self.space.split(alloc)[0]
        w = self.space.width
        return self.space.to_config(alloc, meta | {
            "space": "both", "params": self.nonzero_params(alloc), "nonzero_params": self.nonzero_params(alloc),
            "sliced_params": w.params(kept), "width_score": self.settings.width_score,
            "budget_counts": w.amounts(kept), "budget_limits": [c.describe() for c in w.constraints]})

    @property
    def realized_with(self) -> str:
        return (f"{self.settings.width_score} width masks and the dense model's {self.settings.pruner} ranks of the "
                "kept weights")

    def prune_for_report(self, alloc: np.ndarray, calib: torch.Tensor) -> None:
        """The candidate the search measured (``realize`` prunes the sliced model sequentially instead)."""
        self.realize(alloc)

    def space_record(self) -> BothRecord:
        return BothRecord.from_workspace(self)
