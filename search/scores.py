"""Scores computed once, candidates realized in milliseconds.

For a score-based pruner (magnitude, Wanda, GBLM) the mask at any sparsity is a threshold on a fixed ranking, so the
search ranks every weight once and a candidate becomes ``W_dense · (rank ≥ k)`` per projection plus one forward
pass. Where the ranks' statistics come from is the ``prefix`` choice: the dense model's calibration inputs (as
EvoPress's database uses dense upstream inputs), or inputs propagated through blocks already pruned uniformly at
the budget — what the sequential pruner that realizes the result sees, up to the allocation of the earlier blocks.
OWL's per-block outlier ratios always come from the dense model, as OWL defines them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruners.masks import Target, pruned_count
from pruners.methods import get_method
from pruners.oneshot import extra_stats, make_pruner, prune_model
from pruners.registry import ModelLayout, get_weight, set_weight
from pruners.walker import collect_stats, run_block, walk


def _ranks(score: torch.Tensor, per_row: bool, m: int) -> torch.Tensor:
    """Position of every weight in ascending score order: within its row, its matrix, or its N:M group."""
    if m:
        groups = score.reshape(score.shape[0], -1, m)
        order = torch.argsort(groups, dim=2, stable=True)
        return torch.argsort(order, dim=2).reshape(score.shape).to(torch.int32)
    flat = score if per_row else score.reshape(1, -1)
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    positions = torch.arange(flat.shape[1], dtype=torch.int32, device=order.device)
    ranks.scatter_(1, order, positions.expand_as(order).contiguous())
    return ranks.reshape(score.shape)


def outlier_ratio(metrics: list[torch.Tensor], owl_m: float = 5.0) -> float:
    """OWL's layerwise outlier distribution of one block: % of Wanda metrics above ``owl_m`` × their mean."""
    metric = torch.cat([m.flatten() for m in metrics])
    return 100.0 * (metric > owl_m * metric.mean()).float().mean().item()


@torch.no_grad()
def dense_outlier_ratios(model: nn.Module, lay: ModelLayout, calib_ids: torch.Tensor, device: str = "cpu",
                         batch_size: int = 8) -> list[float]:
    """OWL's outlier ratio of every block from the dense model's calibration inputs (one walk, nothing pruned)."""
    wanda, ratios = make_pruner("wanda"), []

    def visit(i: int, block: nn.Module, batches) -> None:
        with collect_stats(lay.projections[i], full=False) as stats:
            run_block(block, batches)
        ratios.append(outlier_ratio([wanda.score(get_weight(m).float(), stats[n])
                                     for n, m in lay.projections[i].items()]))

    walk(model, calib_ids, visit, device=device, batch_size=batch_size)
    return ratios


def prefix_walk(model: nn.Module, lay: ModelLayout, calib_ids: torch.Tensor, visit, dense: dict[str, torch.Tensor],
                device: str = "cpu", batch_size: int = 8) -> list[float] | None:
    """Walk with ``visit``, which may prune each block before it feeds the next and keep the replaced weights in
    ``dense``; put them back, and return OWL's ratios from the dense model if anything was pruned (else None)."""
    try:
        walk(model, calib_ids, visit, device=device, batch_size=batch_size)
    finally:
        for name, w in dense.items():
            set_weight(lay.projections[lay.block_of(name)][name], w)
    return dense_outlier_ratios(model, lay, calib_ids, device, batch_size) if dense else None


class ScoreCache:
    """Per-projection weight ranks under one pruner and pattern, plus OWL outlier ratios per block."""

    def __init__(self, ranks: dict[str, torch.Tensor], per_row: bool, m: int, outlier_ratio: list[float]):
        self.ranks, self.per_row, self.m, self.outlier_ratio = ranks, per_row, m, outlier_ratio

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, lay: ModelLayout, method: str, m: int, calib_ids: torch.Tensor,
              device: str = "cpu", batch_size: int = 8, prefix: float | None = None) -> ScoreCache:
        """Walk the model once: Wanda statistics (and the pruner's extra statistics, e.g. GBLM's gradient norms)
        per projection → scores and ranks. With ``prefix`` a sparsity, each block is pruned at it from its ranks
        before its outputs feed the next block (the model's weights are dense again afterwards)."""
        pruner, wanda = make_pruner(method), make_pruner("wanda")
        cache = cls({}, get_method(method).selection == "row", m, [])
        extra = extra_stats(pruner, model, calib_ids, device)
        dense: dict[str, torch.Tensor] = {}

        def visit(i: int, block: nn.Module, batches) -> None:
            with collect_stats(lay.projections[i], full=False, extra=extra) as stats:
                run_block(block, batches)
            metrics = []
            for name, module in lay.projections[i].items():
                w = get_weight(module).float()
                metrics.append(wanda.score(w, stats[name]))
                cache.ranks[name] = _ranks(pruner.score(w, stats[name]), cache.per_row, m).cpu()
                if prefix:
                    dense[name] = get_weight(module).clone()
                    set_weight(module, dense[name].masked_fill(cache.mask(name, prefix).to(w.device), 0))
            cache.outlier_ratio.append(outlier_ratio(metrics))

        dense_ratios = prefix_walk(model, lay, calib_ids, visit, dense, device, batch_size)
        cache.outlier_ratio = dense_ratios or cache.outlier_ratio
        return cache

    def save(self, path) -> None:
        tensors = {name: r.contiguous() for name, r in self.ranks.items()}  # Conv1D ranks are transposed views
        tensors["__outlier_ratio__"] = torch.tensor(self.outlier_ratio, dtype=torch.float64)
        save_file(tensors, str(path), metadata={"per_row": str(self.per_row), "m": str(self.m)})

    @classmethod
    def load(cls, path) -> ScoreCache:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        outliers = tensors.pop("__outlier_ratio__").tolist()
        return cls(tensors, meta["per_row"] == "True", int(meta["m"]), outliers)

    def pruned_count(self, name: str, sparsity: float) -> int:
        """How many lowest ranks are pruned at ``sparsity`` (per row, per matrix or per group)."""
        r = self.ranks[name]
        if self.m:
            return Target(sparsity, self.m).n
        return pruned_count(r.shape[1] if self.per_row else r.numel(), sparsity)

    def mask(self, name: str, sparsity: float) -> torch.Tensor:
        """True where a weight is pruned at ``sparsity``: exactly what the one-shot pruner would select."""
        return self.ranks[name] < self.pruned_count(name, sparsity)


class Realizer:
    """Writes allocations into a model in place, keeping one copy of the dense weights."""

    def __init__(self, lay: ModelLayout, cache: ScoreCache):
        self.lay, self.cache = lay, cache
        self.modules = {n: lay.projections[lay.block_of(n)][n] for n in lay.projection_names()}
        self.dense = {n: get_weight(m).clone() for n, m in self.modules.items()}
        device = next(iter(self.modules.values())).weight.device
        self.cache.ranks = {n: r.to(device) for n, r in cache.ranks.items()}

    def apply(self, targets: dict[str, float]) -> None:
        """Set every projection to its dense weight with the masked-out weights zeroed."""
        for name, module in self.modules.items():
            w = self.dense[name]
            s = targets.get(name, 0.0)
            set_weight(module, w.masked_fill(self.cache.mask(name, s), 0) if s > 0 else w)


@dataclass
class OutlierRatios:
    """OWL's outlier ratio per block of the dense model, alone: all a candidate-input search needs of the dense
    statistics (its candidates are pruned from their own inputs, so no ranks are kept: they would hold 4 bytes per
    weight)."""

    outlier_ratio: list[float]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.outlier_ratio))

    @classmethod
    def load(cls, path) -> OutlierRatios:
        return cls([float(v) for v in json.loads(Path(path).read_text())])


class SequentialRealizer:
    """Prunes every candidate for real, as the final model will be (``--stats-inputs candidate``): the one-shot
    pruner walks calibration sequences through the candidate's own pruned blocks. Exact where cached ranks are a
    proxy (whose error on SmolLM2-135M at 70% is as large as what the search gains), at the cost of one
    calibration walk per candidate. The pruner's whole-model statistics (GBLM's gradients) are computed once."""

    def __init__(self, model: nn.Module, lay: ModelLayout, method: str, m: int, calib_ids: torch.Tensor,
                 device: str = "cpu", batch_size: int = 8):
        self.model, self.m, self.calib, self.device, self.batch_size = model, m, calib_ids, device, batch_size
        self.pruner = make_pruner(method)
        self.modules = {n: lay.projections[lay.block_of(n)][n] for n in lay.projection_names()}
        self.dense = {n: get_weight(module).clone() for n, module in self.modules.items()}
        self.extra = extra_stats(self.pruner, model, calib_ids, device)

    def apply(self, targets: dict[str, float]) -> None:
        """Put the dense weights back, then prune every projection with a target sequentially."""
        for name, module in self.modules.items():
            set_weight(module, self.dense[name])
        pruned = {n: Target(s, self.m) for n, s in targets.items() if s > 0}
        if pruned:
            prune_model(self.model, self.pruner, pruned, self.calib, self.device, self.batch_size, extra=self.extra)
