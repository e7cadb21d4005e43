"""What one width-search process holds (``WidthWorkspace``): the sparsity workspace's model, held-out data and
fitness, with the width space (``search.width_space``), head and channel importance cached once per study, and
candidates realized by masking (``search.width_realizer``)."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pruners.width import latency
from pruners.width.counting import shapes
from pruners.width.export import check_exportable
from pruners.width.geometry import geometry
from pruners.width.importance import importance
from pruners.width.latency import LatencyTable
from prunesearch.files import load_or_build
from prunesearch.safety import UserError
from search.budget import Budget
from search.seeds import width_seeds
from search.samplers import allocation_key
from search.width_realizer import WidthRealizer, load_importance, save_importance
from predictors.width_features import WidthRecord
from search.width_space import make_width_space
from search.workspace import Workspace

log = logging.getLogger("prunesearch.search")


class WidthWorkspace(Workspace):
    """A workspace whose allocation is the number of key/value groups and MLP channels every block keeps."""

    def _prepare_space(self, device: str, batch_size: int) -> None:
        """The width space under the budget's limits (refused if infeasible, before any cache is written; a
        latency limit first measures, or loads, this device's latency table)."""
        self.geom = geometry(self.model)
        check_exportable(self.model)  # a width the search finds must slice and save: refuse other families first
        self.shapes = shapes(self.model, self.geom)
        self.m = 0
        self.space = make_width_space(self.geom, self.shapes, self.settings.budget, self.total_params, self.seqlen,
                                      self._latency_table)
        self.budget_kind = "+".join(c.kind for c in self.space.constraints)
        self.multi = self.space.ranged is not None
        if self.multi:  # a Pareto run: trials draw the share of the ranged limit's dense amount saved
            dense = self.space.constraints[self.space.ranged].dense
            ends = Budget.parse(self.settings.budget).ranged.resolve(dense)
            self.target_range = tuple(sorted(1.0 - e / dense for e in ends))
        else:
            self.target_range = (1.0 - self.space.target,) * 2  # the share of the units' parameters removed

    def _latency_table(self, tokens: int) -> LatencyTable:
        """The latency table at ``tokens`` (batch 1): the user's (``--latency-table``, e.g. measured on the device
        the model will serve on), or this device's, measured once and cached per model, device, host and threads."""
        if self.settings.latency_table:
            table = LatencyTable.load(Path(self.settings.latency_table))
            dense = self.geom.widths[0]
            if table.tokens != tokens or table.groups[-1] != dense.kv_heads or table.channels[-1] != dense.intermediate:
                raise UserError(f"--latency-table {self.settings.latency_table} was measured at {table.tokens} tokens "
                                f"for blocks of {table.groups[-1]} key/value groups and {table.channels[-1]} MLP "
                                f"channels; this budget needs {tokens} tokens and the model has {dense.kv_heads} and "
                                f"{dense.intermediate}")
            return table
        device = str(next(self.model.parameters()).device)
        key = hashlib.sha256(json.dumps([str(self.source), tokens, device, torch.get_num_threads(), platform.node()]
                                        ).encode()).hexdigest()[:12]

        def build() -> LatencyTable:
            t = time.perf_counter()
            table = latency.measure(self.model, self.geom, tokens)
            log.info("measured the latency table (%d tokens, %s) in %.1fs", tokens, device, time.perf_counter() - t)
            return table

        self.cache.mkdir(parents=True, exist_ok=True)
        return load_or_build(self.cache / f"latency-{key}.json", LatencyTable.load, build,
                             lambda table, tmp: table.save(tmp), "latency table")

    def _prepare_realizer(self, device: str, batch_size: int) -> None:
        """Head and channel importance (cached per calibration protocol), the seeds, and the masking realizer."""
        self.importance = self._importance(device, batch_size)
        ends = set(self.target_range) if self.multi else {None}
        self.space = self.space.widened([self.space_at(t).fit(make, label) for t in ends
                                         for label, make in self._seed_makers().items()])
        self.realizer = WidthRealizer(self.model, self.geom, self.importance)

    def _importance(self, device: str, batch_size: int):
        """Key/value group and MLP channel importance of the dense model, cached per calibration protocol."""
        s = self.settings
        key = s.key("model", "width_score", "calib", "nsamples", "seqlen", "seed", "data_dir")

        def build():
            t = time.perf_counter()
            imp = importance(self.model, self.calibration_ids(), s.width_score, device, batch_size, self.geom)
            log.info("scored all heads and channels in %.1fs", time.perf_counter() - t)
            return imp

        return load_or_build(self.cache / f"width-importance-{key}.safetensors", load_importance, build,
                             save_importance, "width importance cache")

    def _seed_makers(self) -> dict:
        return width_seeds(self.geom, self.importance, self.shapes)

    def space_at(self, target: float | None):
        """The space whose ranged limit saves the share ``target`` of its dense amount (a Pareto trial's own
        budget); the run's space for None."""
        if target is None:
            return self.space
        return self.space.at(self.space.constraints[self.space.ranged].dense * (1.0 - target))

    def allocation(self, x: np.ndarray, target: float | None = None) -> np.ndarray:
        """The kept groups and channels of sampled shares: whole, within every limit, none able to grow."""
        return self.space_at(target).project(x)

    def nonzero_params(self, alloc: np.ndarray) -> int:
        """Parameters of the model sliced to the allocation (what ``prune --method width`` leaves)."""
        return self.space.params(alloc)

    def realize(self, alloc: np.ndarray) -> None:
        self.realizer.apply(self.space.widths(alloc))

    def effective_key(self, alloc: np.ndarray) -> tuple[float, ...]:
        """Whole kept groups and channels: equal allocations are equal up to float noise."""
        return allocation_key(alloc)

    def reset(self) -> None:
        self.realizer.apply()

    def seeds(self, target: float | None = None) -> dict[str, np.ndarray]:
        """Uniform width and FLAP's global ranking at the least removal that meets the budget, as kept shares."""
        space = self.space_at(target)
        return {label: space.shares(space.fit(make, label)) for label, make in self._seed_makers().items()}

    @property
    def trade_label(self) -> str:
        return f"share of dense {self.space.constraints[self.space.ranged].kind} saved" if self.multi else ""

    def budget_attrs(self, alloc: np.ndarray) -> dict:
        """The removed share of the units' parameters (for a Pareto run: the share of the ranged limit's dense
        amount saved, its second objective) and what every limit counts."""
        share = self.space.saved_share(alloc) if self.multi else self.space.removed_share(alloc)
        return {"budget_sparsity": share, "params": self.space.params(alloc), **self.space.amounts(alloc)}

    def unit_values(self, alloc: np.ndarray) -> dict[str, float]:
        """Kept share of every unit."""
        return {u: float(v) for u, v in zip(self.space.units, self.space.shares(alloc))}

    def budget_columns(self, t) -> dict:
        """What every limit counts of a trial's allocation (parameters, FLOPs per token, bytes, ms)."""
        return {c.kind: t.user_attrs.get(c.kind) for c in self.space.constraints}

    def unit_columns(self, alloc: list | None) -> dict:
        """``w[unit]``: the key/value groups or MLP channels a unit keeps."""
        return {f"w[{u}]": int(alloc[i]) if alloc else None for i, u in enumerate(self.space.units)}

    def config(self, alloc: np.ndarray, meta: dict) -> dict:
        """The ``width`` section of ``prune --method width --config``, with the search's protocol."""
        return self.space.to_config(alloc, meta | {"space": "width", "params": self.nonzero_params(alloc),
                                                   "width_score": self.settings.width_score,
                                                   "budget_counts": self.space.amounts(alloc),
                                                   "budget_limits": [c.describe() for c in self.space.constraints]})

    @property
    def realized_with(self) -> str:
        return f"{self.settings.width_score} width masks (outputs identical to the sliced model)"

    def prune_for_report(self, alloc: np.ndarray, calib: torch.Tensor) -> None:
        """Mask the allocation's widths: the outputs of the model ``prune --method width`` slices."""
        self.realize(alloc)

    def space_record(self) -> WidthRecord:
        """What ``space.json`` records of a width run (``predictors.width_features``): units, dense counts, parameters
        per group or channel, and the budget."""
        return WidthRecord.from_workspace(self)
