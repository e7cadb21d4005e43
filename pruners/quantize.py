"""Weight quantization on top of a sparse model that keeps its sparsity pattern exactly, and its storage cost.

Two quantizers: per-group round-to-nearest (asymmetric min-max grid per row and group of input columns) and the
SparseGPT/GPTQ joint quantizer with the mask fixed (``pruners.sparsegpt.sparsegpt(mask=..., wbits=...)``, per
output channel, with error compensation on the kept weights). Both are pruner-like objects for
``pruners.oneshot.prune_model``: the current zeros of each weight are its mask, and pruned weights stay exactly 0.
Weights are stored de-quantized (fake quantization); :func:`size_report` counts what a packed format would take.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pruners.masks import Target
from pruners.oneshot import prune_model
from pruners.registry import get_weight, layout
from pruners.sparsegpt import sparsegpt
from pruners.walker import InputStats
from prunesearch.safety import UserError

SCALE_BITS = 16  # one fp16 scale per group; the zero point takes wbits


def rtn_quantize(weight: torch.Tensor, pruned: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest on a min-max grid per row and group of ``group_size`` input columns; pruned entries → 0.

    The grid always contains 0 (min ≤ 0 ≤ max, as GPTQ's), so zeros are exact; a group size of 0 means one
    group per row.
    """
    rows, cols = weight.shape
    g = group_size or cols
    if cols % g:
        raise UserError(f"group size {g} does not divide the layer's {cols} input columns")
    maxq = 2**bits - 1
    w = weight.float().masked_fill(pruned, 0.0).view(rows, cols // g, g)
    xmin = w.amin(-1, keepdim=True).clamp(max=0)
    xmax = w.amax(-1, keepdim=True).clamp(min=0)
    flat = xmin == xmax
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return (scale * (q - zero)).view(rows, cols).masked_fill(pruned, 0.0).to(weight.dtype)


class RTNQuantizer:
    """Per-group round-to-nearest for ``prune_model`` (data-free): keeps every weight's zeros as its mask."""

    name = "rtn"
    stats = None

    def __init__(self, wbits: int = 4, group_size: int = 128):
        self.wbits, self.group_size = wbits, group_size

    def prune(self, weight: torch.Tensor, stats: InputStats | None, target: Target) -> torch.Tensor:
        group = self.group_size if self.group_size and weight.shape[1] % self.group_size == 0 else 0
        return rtn_quantize(weight, weight == 0, self.wbits, group)


class GPTQQuantizer:
    """SparseGPT's joint quantizer with the mask fixed to the weight's zeros (GPTQ error compensation)."""

    name = "gptq"
    stats = "hessian"
    group_size = 0  # per output channel

    def __init__(self, wbits: int = 4, percdamp: float = 0.01, blocksize: int = 128):
        self.wbits, self.percdamp, self.blocksize = wbits, percdamp, blocksize

    def prune(self, weight: torch.Tensor, stats: InputStats, target: Target) -> torch.Tensor:
        pruned = weight == 0
        out, _, _ = sparsegpt(weight, stats.hessian, target, self.blocksize, self.percdamp, self.wbits, mask=pruned)
        return out.masked_fill(pruned, 0.0)


QUANTIZERS = {"rtn": RTNQuantizer, "gptq": GPTQQuantizer}


def make_quantizer(method: str, wbits: int, group_size: int = 128):
    """A quantizer by name (``rtn`` or ``gptq``) for ``prune_model``."""
    if method not in QUANTIZERS:
        raise UserError(f"unknown quantizer {method!r}; choose one of {', '.join(QUANTIZERS)}")
    if not 2 <= wbits <= 8:
        raise UserError(f"wbits must be in 2..8, got {wbits}")
    return RTNQuantizer(wbits, group_size) if method == "rtn" else GPTQQuantizer(wbits)


def quantize_model(model: nn.Module, targets: dict[str, Target], method: str, wbits: int, group_size: int = 128,
                   calib_ids: torch.Tensor | None = None, device: str = "cpu", batch_size: int = 8) -> dict:
    """Quantize every projection of ``model`` in place keeping its zeros; GPTQ walks the blocks on ``calib_ids``."""
    return prune_model(model, make_quantizer(method, wbits, group_size), targets, calib_ids, device, batch_size)


def size_report(model: nn.Module, targets: dict[str, Target], wbits: int | None, group_size: int = 0,
                extra_params: int = 0) -> dict:
    """Storage in bits of the prunable projections and of the whole model, against fp32.

    Per projection: kept values at ``wbits`` (32 when unquantized) + one fp16 scale and a ``wbits`` zero point
    per row-group + the sparsity metadata (N:M: log2(M) bits of position per kept value, i.e. the 2 bits of the
    2:4 format; unstructured: a 1-bit-per-weight bitmap; dense layers: none). Everything else in the model
    (embeddings, norms, head) and ``extra_params`` (SLoRB) count 16 bits when quantizing, else 32.
    """
    lay = layout(model)
    values = scales = metadata = dense_bits = 0
    for name in lay.projection_names():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        rows, cols = w.shape
        target = targets.get(name, Target(0.0))
        if target.m and target.sparsity:  # the N:M format stores M−N values per group, zero or not
            kept = rows * cols // target.m * (target.m - target.n)
        else:
            kept = int((w != 0).sum()) if target.sparsity else rows * cols
        dense_bits += 32 * rows * cols
        values += kept * (wbits or 32)
        if wbits:
            g = group_size if group_size and cols % group_size == 0 else cols
            scales += rows * (cols // g) * (SCALE_BITS + wbits)
        if target.sparsity and target.m:
            metadata += kept * math.ceil(math.log2(target.m))
        elif target.sparsity:
            metadata += rows * cols
    proj_params = sum(lay.numel(n) for n in lay.projection_names())
    other = sum(p.numel() for p in model.parameters()) - proj_params
    compressed = values + scales + metadata
    whole_fp32 = 32 * (proj_params + other)
    whole = compressed + (16 if wbits else 32) * (other + extra_params)
    return {
        "wbits": wbits, "group_size": group_size or None,
        "projection_bits": {"values": values, "scales_zeros": scales, "metadata": metadata, "total": compressed,
                            "fp32": dense_bits},
        "projection_ratio_vs_fp32": dense_bits / compressed,
        "projection_ratio_vs_fp32_without_metadata": dense_bits / (values + scales),
        "model_bits": whole, "model_fp32_bits": whole_fp32, "model_ratio_vs_fp32": whole_fp32 / whole,
        "extra_params_16bit": extra_params,
    }
