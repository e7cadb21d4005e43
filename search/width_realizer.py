"""Width candidates realized in place by masking: head and channel importance computed once per study (cached as
safetensors), then each candidate restores the dense output projections and zeroes the columns of its
lowest-importance key/value groups and MLP channels (``pruners.width.slicing.mask_block``), which gives exactly
the outputs of the sliced model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruners.registry import get_weight, set_weight
from pruners.width.geometry import BlockWidth, Geometry, sub
from pruners.width.importance import Importance
from pruners.width.slicing import realize


def save_importance(imp: Importance, path: Path) -> None:
    """Write group and channel scores and mean inputs of every block to one safetensors file."""
    tensors = {}
    for i, (groups, channels, (attn, mlp)) in enumerate(zip(imp.groups, imp.channels, imp.means)):
        tensors |= {f"groups.{i}": groups, f"channels.{i}": channels, f"mean_attn.{i}": attn, f"mean_mlp.{i}": mlp}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"metric": imp.metric})


def load_importance(path: Path) -> Importance:
    """Read what ``save_importance`` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metric = f.metadata()["metric"]
    t = load_file(str(path))
    n = sum(1 for k in t if k.startswith("groups."))
    return Importance(metric, [t[f"groups.{i}"] for i in range(n)], [t[f"channels.{i}"] for i in range(n)],
                      [(t[f"mean_attn.{i}"], t[f"mean_mlp.{i}"]) for i in range(n)])


class WidthRealizer:
    """Writes width allocations into a model in place, keeping one copy of the dense output projections."""

    def __init__(self, model: nn.Module, geom: Geometry, imp: Importance):
        self.model, self.imp, self.dense_widths = model, imp, list(geom.widths)
        self.modules = [sub(geom.block(i), path) for i in range(len(geom.widths))
                        for path in (geom.heads.out, geom.ffn.down)]
        self.dense = [get_weight(m).clone() for m in self.modules]

    @torch.no_grad()
    def apply(self, widths: list[BlockWidth] | None = None) -> None:
        """Restore the dense weights, then mask every block down to ``widths`` (None: stay dense)."""
        for m, w in zip(self.modules, self.dense):
            set_weight(m, w)
        if widths is not None:
            realize(self.model, widths, self.imp, mask=True)
