"""What one width-search process holds (``WidthWorkspace``): the sparsity workspace's model, held-out data and
fitness, with the width space (``search.width_space``), head and channel importance cached once per study, and
candidates realized by masking (``search.width_realizer``)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pruners.width.counting import shapes
from pruners.width.geometry import geometry
from pruners.width.importance import importance
from prunesearch.files import load_or_build
from search.seeds import width_seeds
from search.width_realizer import WidthRealizer, load_importance, save_importance
from search.width_record import WidthRecord
from search.width_space import make_width_space
from search.workspace import Workspace

log = logging.getLogger("prunesearch.search")


class WidthWorkspace(Workspace):
    """A workspace whose allocation is the number of key/value groups and MLP channels every block keeps."""

    def _prepare_space(self, device: str, batch_size: int) -> None:
        """The width space at the ``params=`` budget (refused if infeasible, before any cache is written)."""
        self.geom = geometry(self.model)
        self.shapes = shapes(self.model, self.geom)
        self.budget_kind, self.multi, self.m = "params", False, 0
        self.space = make_width_space(self.geom, self.shapes, self.settings.budget, self.total_params)
        self.target_range = (1.0 - self.space.target,) * 2  # the share of the units' parameters removed

    def _prepare_realizer(self, device: str, batch_size: int) -> None:
        """Head and channel importance (cached per calibration protocol), the seeds, and the masking realizer."""
        s = self.settings
        key = s.key("model", "width_score", "calib", "nsamples", "seqlen", "seed", "data_dir")

        def build():
            t = time.perf_counter()
            imp = importance(self.model, self.calibration_ids(), s.width_score, device, batch_size, self.geom)
            log.info("scored all heads and channels in %.1fs", time.perf_counter() - t)
            return imp

        self.importance = load_or_build(self.cache / f"width-importance-{key}.safetensors", load_importance, build,
                                        save_importance, "width importance cache")
        self._seeds = {label: self.space.kept(w) for label, w in
                       width_seeds(self.geom, self.importance, self.shapes, self.space.budget).items()}
        self.space = self.space.widened(list(self._seeds.values()))
        self.realizer = WidthRealizer(self.model, self.geom, self.importance)

    def allocation(self, x: np.ndarray, target: float | None = None) -> np.ndarray:
        """The kept groups and channels of sampled shares: whole, on the budget or just under it."""
        return self.space.project(x)

    def nonzero_params(self, alloc: np.ndarray) -> int:
        """Parameters of the model sliced to the allocation (what ``prune --method width`` leaves)."""
        return self.space.params(alloc)

    def realize(self, alloc: np.ndarray) -> None:
        self.realizer.apply(self.space.widths(alloc))

    def reset(self) -> None:
        self.realizer.apply()

    def seeds(self, target: float | None = None) -> dict[str, np.ndarray]:
        """Uniform width and FLAP's global ranking at the budget, as sampled kept shares."""
        return {label: self.space.shares(kept) for label, kept in self._seeds.items()}

    def budget_attrs(self, alloc: np.ndarray) -> dict:
        return {"budget_sparsity": self.space.removed_share(alloc), "params": self.space.params(alloc)}

    def unit_values(self, alloc: np.ndarray) -> dict[str, float]:
        """Kept share of every unit."""
        return {u: float(v) for u, v in zip(self.space.units, self.space.shares(alloc))}

    def unit_columns(self, alloc: list | None) -> dict:
        """``w[unit]``: the key/value groups or MLP channels a unit keeps."""
        return {f"w[{u}]": int(alloc[i]) if alloc else None for i, u in enumerate(self.space.units)}

    def config(self, alloc: np.ndarray, meta: dict) -> dict:
        """The ``width`` section of ``prune --method width --config``, with the search's protocol."""
        return self.space.to_config(alloc, meta | {"space": "width", "params": self.nonzero_params(alloc),
                                                   "width_score": self.settings.width_score})

    @property
    def realized_with(self) -> str:
        return f"{self.settings.width_score} width masks (outputs identical to the sliced model)"

    def prune_for_report(self, alloc: np.ndarray, calib: torch.Tensor) -> None:
        """Mask the allocation's widths: the outputs of the model ``prune --method width`` slices."""
        self.realize(alloc)

    def space_record(self) -> WidthRecord:
        """What ``space.json`` records of a width run (``search.width_record``): units, dense counts, parameters
        per group or channel, and the budget."""
        return WidthRecord.from_workspace(self)
