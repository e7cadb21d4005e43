"""Prune a whole model one-shot with any pruner: the driver every method shares."""

from __future__ import annotations

import time

import torch
from torch import nn

from pruners.masks import Target
from pruners.methods import get_method
from pruners.registry import get_weight, layout, set_weight
from pruners.walker import collect_stats, run_block, walk


def make_pruner(method: str, **options):
    """Instantiate a pruner by name (``pruners.methods``); options are the method's own (e.g. ``wbits`` for
    SparseGPT)."""
    return get_method(method).cls(**{k: v for k, v in options.items() if v is not None})


def extra_stats(pruner, model: nn.Module, calib_ids: torch.Tensor | None, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """Per-projection statistics a pruner computes on the whole dense model before the walk (its optional
    ``extra_stats`` method, e.g. GBLM's gradient norms); every driver hands them over as ``InputStats.extra``."""
    compute = getattr(pruner, "extra_stats", None)
    return compute(model, calib_ids, device) if compute is not None else {}


def prune_model(model: nn.Module, pruner, targets: dict[str, Target], calib_ids: torch.Tensor | None = None,
                device: torch.device | str = "cpu", batch_size: int = 8,
                stats_dtype: torch.dtype = torch.float32, extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Prune every projection of ``model`` in place to its target; returns per-layer sparsity and timings.

    Data-free pruners (magnitude) prune the weights directly; the others walk the blocks with ``calib_ids``,
    gathering statistics on each dense block and propagating the calibration inputs through pruned blocks.
    A pruner with ``prune_block(i, block, batches, projections, targets, layout)`` prunes each block's touched
    projections itself; one with ``details()`` adds what it reports (hyperparameters, diagnostics) to the result.
    ``extra``: the pruner's whole-model statistics computed beforehand (``extra_stats``), for a caller that prunes
    many allocations of the same dense model (the search's sequential realizer); None computes them here.
    """
    lay = layout(model)
    touched = {n for n, t in targets.items() if t.sparsity > 0 or getattr(pruner, "wbits", None)}
    start = time.perf_counter()
    if pruner.stats is None:
        for block in lay.projections:
            for name, module in block.items():
                if name in touched:
                    set_weight(module, pruner.prune(get_weight(module).float(), None, targets[name]))
    else:
        if calib_ids is None:
            raise ValueError(f"{pruner.name} needs calibration data")
        if extra is None:
            extra = extra_stats(pruner, model, calib_ids, device) if touched else {}

        def visit(i: int, block: nn.Module, batches) -> None:
            modules = {n: m for n, m in lay.projections[i].items() if n in touched}
            if hasattr(pruner, "prune_block"):  # block-level pruners (SparseLLM) optimize projections jointly
                pruner.prune_block(i, block, batches, modules, targets, lay)
                return
            with collect_stats(modules, full=pruner.stats == "hessian", dtype=stats_dtype, extra=extra) as stats:
                run_block(block, batches)
            for name, module in modules.items():
                set_weight(module, pruner.prune(get_weight(module).float(), stats[name], targets[name]))

        walk(model, calib_ids, visit, device=device, batch_size=batch_size)
    result = {"layers": sparsity_table(model, targets), "prune_seconds": time.perf_counter() - start}
    if hasattr(pruner, "details"):
        result["details"] = pruner.details()
    return result


def sparsity_table(model: nn.Module, targets: dict[str, Target] | None = None) -> list[dict]:
    """Per projection: block, role, shape, target and actual fraction of zero weights."""
    lay = layout(model)
    rows = []
    for name in lay.projection_names():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        t = targets.get(name) if targets else None
        rows.append({
            "name": name, "block": lay.block_of(name), "kind": lay.kind_of(name), "shape": list(w.shape),
            "target": str(t) if t else None, "target_sparsity": t.sparsity if t else None,
            "actual_sparsity": (w == 0).float().mean().item(),
        })
    return rows


def global_sparsity(rows: list[dict]) -> float:
    """Parameter-weighted sparsity over all prunable projections."""
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return sum(r["actual_sparsity"] * r["shape"][0] * r["shape"][1] for r in rows) / total
