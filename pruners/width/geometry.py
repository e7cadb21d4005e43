"""The shape of a model's width: per layer, query heads, key/value heads and MLP channels, and where they sit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pruners.registry import FFN, Heads, ModelLayout, get_weight, layout


@dataclass(frozen=True)
class BlockWidth:
    """What one block keeps: query heads, key/value heads (a divisor of the query heads) and MLP channels."""

    heads: int
    kv_heads: int
    intermediate: int


def sub(block: nn.Module, path: str) -> nn.Module:
    """The submodule of ``block`` at a dotted local path."""
    node = block
    for part in path.split("."):
        node = getattr(node, part)
    return node


def replace(block: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted local path inside ``block``."""
    parent, _, name = path.rpartition(".")
    setattr(sub(block, parent) if parent else block, name, module)


@dataclass
class Geometry:
    """A model's head size, query heads per key/value head, gating, and each block's current width."""

    layout: ModelLayout
    config: Any
    heads: Heads
    ffn: FFN
    hidden: int
    head_dim: int
    group: int
    widths: list[BlockWidth]

    @property
    def gated(self) -> bool:
        return self.ffn.gate is not None

    def block(self, i: int) -> nn.Module:
        return self.layout.blocks[i]

    def qkv_rows(self, i: int, groups: list[int]) -> list[list[int]]:
        """Output rows of each q/k/v projection (one list for a fused projection) that hold key/value ``groups``."""
        hd, g = self.head_dim, self.group
        q = [r for k in groups for r in range(k * g * hd, (k + 1) * g * hd)]
        kv = [r for k in groups for r in range(k * hd, (k + 1) * hd)]
        if not self.heads.fused:
            return [q, kv, kv]
        width = self.widths[i].heads * hd
        return [q + [width + r for r in kv] + [2 * width + r for r in kv]]

    def out_columns(self, groups: list[int]) -> list[int]:
        """Input columns of the attention output projection that read key/value ``groups``' query heads."""
        span = self.group * self.head_dim
        return [c for k in groups for c in range(k * span, (k + 1) * span)]


def geometry(model: nn.Module) -> Geometry:
    """Read the width structure of ``model``; a family without a known head layout is a clear error."""
    lay = layout(model)
    heads, ffn = lay.width_spec()
    config = model.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    widths = []
    for block in lay.blocks:
        q = get_weight(sub(block, heads.out)).shape[1] // head_dim
        widths.append(BlockWidth(q, q // group, get_weight(sub(block, ffn.down)).shape[1]))
    return Geometry(lay, config, heads, ffn, hidden, head_dim, group, widths)
