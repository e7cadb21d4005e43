"""Remove key/value groups (with their query heads) and MLP channels from blocks, or mask them in place.

Slicing rebuilds each touched projection with only the kept rows (q/k/v, up/gate) or input columns (attention
output, down projection), and sets the head counts the attention module reads in ``forward``. Masking zeroes the
same input columns of the output projections, which gives the same outputs without changing shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from pruners.registry import Conv1D, get_weight
from pruners.width.geometry import BlockWidth, Geometry, replace, sub
from pruners.width.importance import Importance
from prunesearch.safety import UserError


def _rebuilt(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of ``module``'s type holding ``weight`` (``nn.Linear`` layout, out x in) and ``bias``."""
    with torch.device("meta"):
        if isinstance(module, Conv1D):
            new = Conv1D(weight.shape[0], weight.shape[1])
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter((weight.t() if isinstance(module, Conv1D) else weight).contiguous(),
                              requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=module.weight.requires_grad)
    return new


def bias_shift(module: nn.Module, removed: list[int], mean: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: the mean contribution of the ``removed`` input columns, to be added to the bias."""
    w = get_weight(module)[:, removed]
    return (w.double() @ mean[removed].double().to(w.device)).to(w.dtype)


def _check(geom: Geometry, i: int, groups: list[int], channels: list[int]) -> None:
    width = geom.widths[i]
    if not groups or not channels:
        raise ValueError(f"block {i} would keep no {'attention heads' if not groups else 'MLP channels'}: width "
                         "pruning keeps at least one key/value group and one MLP channel per block")
    if groups != sorted(set(groups)) or groups[-1] >= width.kv_heads or groups[0] < 0:
        raise ValueError(f"block {i}: key/value groups to keep must be distinct indices below {width.kv_heads}")
    if channels != sorted(set(channels)) or channels[-1] >= width.intermediate or channels[0] < 0:
        raise ValueError(f"block {i}: MLP channels to keep must be distinct indices below {width.intermediate}")


def _removed(n: int, kept: list[int]) -> list[int]:
    keep = set(kept)
    return [j for j in range(n) if j not in keep]


def _lacking_bias(geom: Geometry) -> bool:
    block = geom.block(0)
    return sub(block, geom.heads.out).bias is None or sub(block, geom.ffn.down).bias is None


def require_bias(geom: Geometry) -> None:
    """Raise unless FLAP's bias compensation is possible: the output projections have biases, or the family's
    config flags can give them some (``bias_flags`` in pruners/registry.py)."""
    flags = geom.layout.bias_flags
    if _lacking_bias(geom) and not (flags and all(hasattr(geom.config, f) for f in flags)):
        raise UserError(f"bias compensation needs biases on the attention output and MLP down projections; "
                        f"{geom.config.model_type} models have none and cannot add them, so it is unavailable there")


def add_biases(geom: Geometry) -> None:
    """Give every attention and MLP projection a bias (zeros where there was none) and set the family's config
    flags, so FLAP's compensation has biases to shift and the model saves and reloads with them."""
    require_bias(geom)
    if not _lacking_bias(geom):
        return
    for flag in geom.layout.bias_flags:
        setattr(geom.config, flag, True)
    paths = [*geom.heads.qkv, geom.heads.out, geom.ffn.up, geom.ffn.down] + ([geom.ffn.gate] if geom.gated else [])
    for block in geom.layout.blocks:
        for path in paths:
            m = sub(block, path)
            if m.bias is None:
                w = get_weight(m)
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                      requires_grad=m.weight.requires_grad)


def _shifted(module: nn.Module, shift: torch.Tensor | None) -> torch.Tensor | None:
    if shift is None:
        return None if module.bias is None else module.bias.data
    return module.bias.data + shift.to(module.bias.dtype)


def slice_block(geom: Geometry, i: int, groups: list[int], channels: list[int],
                means: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Keep only key/value ``groups`` (with their query heads) and MLP ``channels`` of block ``i``, in place.

    ``means`` (mean inputs of the attention output and down projections) adds FLAP's bias compensation.
    """
    groups, channels = sorted(groups), sorted(channels)
    _check(geom, i, groups, channels)
    block, heads, ffn, width = geom.block(i), geom.heads, geom.ffn, geom.widths[i]
    with torch.no_grad():
        for path, rows in zip(heads.qkv, geom.qkv_rows(i, groups)):
            m = sub(block, path)
            replace(block, path, _rebuilt(m, get_weight(m)[rows], None if m.bias is None else m.bias.data[rows]))
        for path, cols, n, k in ((heads.out, geom.out_columns(groups), width.heads * geom.head_dim, 0),
                                 (ffn.down, channels, width.intermediate, 1)):
            m = sub(block, path)
            shift = bias_shift(m, _removed(n, cols), means[k]) if means is not None else None
            replace(block, path, _rebuilt(m, get_weight(m)[:, cols], _shifted(m, shift)))
        for path in (ffn.up, ffn.gate):
            if path:
                m = sub(block, path)
                replace(block, path, _rebuilt(m, get_weight(m)[channels],
                                              None if m.bias is None else m.bias.data[channels]))
    kept_heads = len(groups) * geom.group
    attention = sub(block, heads.module)
    for attr in heads.count_attrs:
        setattr(attention, attr, kept_heads)
    for attr in heads.width_attrs:
        setattr(attention, attr, kept_heads * geom.head_dim)
    geom.widths[i] = BlockWidth(kept_heads, len(groups), len(channels))


def mask_block(geom: Geometry, i: int, groups: list[int], channels: list[int],
               means: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Zero the output-projection columns of block ``i``'s removed groups and channels (shapes unchanged)."""
    groups, channels = sorted(groups), sorted(channels)
    _check(geom, i, groups, channels)
    block, width = geom.block(i), geom.widths[i]
    with torch.no_grad():
        for path, cols, n, k in ((geom.heads.out, geom.out_columns(groups), width.heads * geom.head_dim, 0),
                                 (geom.ffn.down, channels, width.intermediate, 1)):
            m = sub(block, path)
            removed = _removed(n, cols)
            shift = bias_shift(m, removed, means[k]) if means is not None else None
            bias = _shifted(m, shift)
            get_weight(m)[:, removed] = 0
            if shift is not None:
                m.bias.data.copy_(bias)


def realize(model: nn.Module, widths: list[BlockWidth], imp: Importance, bias_compensation: bool = False,
            mask: bool = False) -> Geometry:
    """Give every block of ``model`` its width, keeping each block's highest-scoring groups and channels.

    Slicing (default) removes them and turns the model into its width-export class (``pruners.width.export``);
    ``mask`` zeroes them instead. ``bias_compensation`` adds FLAP's mean contribution of what is removed.
    """
    from pruners.width.export import as_export, check_exportable
    from pruners.width.geometry import geometry

    geom = geometry(model)
    if not mask:
        check_exportable(model)
    if bias_compensation:
        add_biases(geom)
    if len(widths) != len(geom.widths):
        raise ValueError(f"{len(widths)} block widths given for a model with {len(geom.widths)} blocks")
    for i, w in enumerate(widths):
        if w != geom.widths[i]:
            groups, channels = imp.keep(i, w.kv_heads, w.intermediate)
            (mask_block if mask else slice_block)(geom, i, groups, channels,
                                                  imp.means[i] if bias_compensation else None)
    if not mask:
        as_export(model, geom)
    return geom
