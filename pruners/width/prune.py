"""Width-prune a whole model: score its units on calibration data, allocate widths, slice, and report."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from pruners.width.counting import Shapes, flops_per_token, memory_bytes, params, shapes
from pruners.width.geometry import BlockWidth, Geometry, geometry
from pruners.width.importance import Importance, importance
from pruners.width.slicing import realize, require_bias

Allocator = Callable[[Geometry, Importance, Shapes], list[BlockWidth]]


def _counts(s: Shapes, widths: list[BlockWidth], seqlen: int) -> dict:
    return {"params": params(s, widths), "block_params": sum(s.block_params(w) for w in widths),
            "flops_per_token": flops_per_token(s, widths, seqlen), "memory_bytes": memory_bytes(s, widths, seqlen)}


def prune_width(model: nn.Module, calib_ids: torch.Tensor, allocate: Allocator, metric: str = "flap",
                bias_compensation: bool = False, device: torch.device | str = "cpu", batch_size: int = 8) -> dict:
    """Slice ``model`` in place to the widths ``allocate`` picks from the unit scores; returns per-layer widths and
    counts before/after (FLOPs per token and KV cache at the calibration sequence length)."""
    geom = geometry(model)
    if bias_compensation:
        require_bias(geom)  # before the walk, not after it
    s = shapes(model, geom)
    before = list(geom.widths)
    start = time.perf_counter()
    imp = importance(model, calib_ids, metric, device, batch_size, geom)
    widths = allocate(geom, imp, s)
    geom = realize(model, widths, imp, bias_compensation)
    seqlen = calib_ids.shape[1]
    return {
        "layers": [{"block": i, "heads": w.heads, "kv_heads": w.kv_heads, "intermediate": w.intermediate,
                    "dense": {"heads": b.heads, "kv_heads": b.kv_heads, "intermediate": b.intermediate}}
                   for i, (b, w) in enumerate(zip(before, widths))],
        "before": _counts(s, before, seqlen), "after": _counts(shapes(model, geom), widths, seqlen),
        "counted_at_seqlen": seqlen,
        "score": metric, "bias_compensation": bias_compensation, "prune_seconds": time.perf_counter() - start,
    }
