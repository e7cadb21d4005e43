"""Importance of key/value groups and MLP channels from one calibration walk over the dense blocks.

Both scores are per input column of a block's output projections (attention output, MLP down), summed over the
columns of a unit (all query heads of a key/value group; one channel):

- ``wanda``: Σ_i |W_ij| · ||X_j||₂, Wanda's |W|·||X|| taken over the whole column (X over all calibration tokens);
- ``flap``: FLAP's fluctuation Var(X_j) · ||W_:,j||², the variance over calibration tokens (unbiased).

The mean inputs are kept too, for FLAP's bias compensation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pruners.registry import get_weight
from pruners.walker import run_block, walk
from pruners.width.geometry import Geometry, geometry, sub
from prunesearch.safety import UserError

METRICS = ("wanda", "flap")


class _Moments:
    """Per-column sum and sum of squares of a layer's inputs over calibration tokens (float64)."""

    def __init__(self, columns: int, device) -> None:
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.ntok = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        self.ntok += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.ntok, 1)

    @property
    def var(self) -> torch.Tensor:
        return ((self.sq - self.ntok * self.mean ** 2) / max(self.ntok - 1, 1)).clamp_min(0)


@contextmanager
def _moments(modules: list[nn.Module]) -> Iterator[list[_Moments]]:
    stats = [_Moments(get_weight(m).shape[1], m.weight.device) for m in modules]
    handles = [m.register_forward_hook(lambda _m, inp, _out, s=s: s.add(inp[0].detach()))
               for m, s in zip(modules, stats)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def column_scores(module: nn.Module, stats: _Moments, metric: str) -> torch.Tensor:
    """Score of each input column of an output projection under ``metric``."""
    w = get_weight(module).double()
    if metric == "wanda":
        return w.abs().sum(0) * stats.sq.sqrt().to(w.device)
    if metric == "flap":
        return stats.var.to(w.device) * (w * w).sum(0)
    raise ValueError(f"unknown width score {metric!r}; choose one of {', '.join(METRICS)}")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


@dataclass
class Importance:
    """Per block: a score per key/value group and per MLP channel, and the mean inputs of the output projections."""

    metric: str
    groups: list[torch.Tensor]
    channels: list[torch.Tensor]
    means: list[tuple[torch.Tensor, torch.Tensor]]

    def keep(self, i: int, groups: int, channels: int) -> tuple[list[int], list[int]]:
        """Block ``i``'s ``groups`` highest-scoring key/value groups and ``channels`` channels, in index order."""
        return _top(self.groups[i], groups), _top(self.channels[i], channels)


def importance(model: nn.Module, calib_ids: torch.Tensor, metric: str = "flap", device: torch.device | str = "cpu",
               batch_size: int = 8, geom: Geometry | None = None) -> Importance:
    """Score every key/value group and MLP channel of ``model`` on ``calib_ids`` (the model is not changed)."""
    if metric not in METRICS:
        raise UserError(f"unknown width score {metric!r}; choose one of {', '.join(METRICS)}")
    geom = geom or geometry(model)
    result = Importance(metric, [], [], [])

    def visit(i: int, block: nn.Module, batches) -> None:
        out, down = sub(block, geom.heads.out), sub(block, geom.ffn.down)
        with _moments([out, down]) as (attn, mlp):
            run_block(block, batches)
        span = geom.group * geom.head_dim
        result.groups.append(column_scores(out, attn, metric).view(-1, span).sum(1).cpu())
        result.channels.append(column_scores(down, mlp, metric).cpu())
        result.means.append((attn.mean.cpu(), mlp.mean.cpu()))

    walk(model, calib_ids, visit, device=device, batch_size=batch_size)
    return result
