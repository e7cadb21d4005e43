"""Importance of key/value groups and MLP channels from one calibration walk over the dense blocks.

``wanda`` and ``flap`` score each input column of a block's output projections (attention output, MLP down),
summed over the columns of a unit (all query heads of a key/value group; one channel):

- ``wanda``: Σ_i |W_ij| · ||X_j||₂, Wanda's |W|·||X|| taken over the whole column (X over all calibration tokens);
- ``flap``: FLAP's fluctuation Var(X_j) · ||W_:,j||², the variance over calibration tokens (unbiased).

``taylor`` is the first-order Taylor saliency Σ |W ⊙ ∂L/∂W| over every weight a unit owns: the q/k/v rows of a
key/value group and its query heads and their output-projection columns; a channel's up (and gate) row and its
down-projection column. L is the causal-LM loss averaged over the calibration sequences; its gradient comes from
GBLM's gradient pass (``pruners.gblm.cached_gradients`` with the ``mean`` reduction, cached like GBLM's norms).

The mean inputs are kept too, for FLAP's bias compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruners.registry import get_weight
from pruners.walker import InputStats, collect_stats, run_block, walk
from pruners.width.geometry import Geometry, geometry, sub
from prunesearch.safety import UserError

METRICS = ("wanda", "flap", "taylor")


def column_scores(module: nn.Module, stats: InputStats, metric: str) -> torch.Tensor:
    """Score of each input column of an output projection under ``metric``."""
    w = get_weight(module).double()
    if metric == "wanda":
        return w.abs().sum(0) * stats.sq.sqrt().to(w.device)
    if metric == "flap":
        return stats.var.to(w.device) * (w * w).sum(0)
    raise ValueError(f"unknown column score {metric!r}; choose wanda or flap")


def taylor_scores(geom: Geometry, i: int, grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ |W ⊙ G| over the weights of every key/value group and every MLP channel of block ``i`` (``grads``: the
    loss gradient of each projection by full name, ``nn.Linear`` layout)."""
    block = geom.block(i)
    names = {id(m): n for n, m in geom.layout.projections[i].items()}

    def saliency(path: str) -> torch.Tensor:
        m = sub(block, path)
        w = get_weight(m).double()
        return (w * grads[names[id(m)]].to(w.device, torch.float64)).abs()

    qkv = [saliency(p).sum(1) for p in geom.heads.qkv]  # per output row
    out = saliency(geom.heads.out).sum(0)  # per input column
    groups = torch.stack([sum(r[rows].sum() for r, rows in zip(qkv, geom.qkv_rows(i, [k])))
                          + out[geom.out_columns([k])].sum() for k in range(geom.widths[i].kv_heads)])
    channels = saliency(geom.ffn.down).sum(0) + sum(saliency(p).sum(1) for p in (geom.ffn.up, geom.ffn.gate) if p)
    return groups, channels


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
    if metric == "taylor":
        from pruners.gblm import cached_gradients

        grads = cached_gradients(model, calib_ids, "mean", 1.0, device)[0]

    def visit(i: int, block: nn.Module, batches) -> None:
        out, down = sub(block, geom.heads.out), sub(block, geom.ffn.down)
        with collect_stats({"attn": out, "mlp": down}, full=False, dtype=torch.float64) as stats:
            run_block(block, batches)
        attn, mlp = stats["attn"], stats["mlp"]
        if metric == "taylor":
            groups, channels = taylor_scores(geom, i, grads)
        else:
            groups = column_scores(out, attn, metric).view(-1, geom.group * geom.head_dim).sum(1)
            channels = column_scores(down, mlp, metric)
        result.groups.append(groups.cpu())
        result.channels.append(channels.cpu())
        result.means.append((attn.mean.cpu(), mlp.mean.cpu()))

    walk(model, calib_ids, visit, device=device, batch_size=batch_size)
    return result
