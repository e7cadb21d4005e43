"""The walk over a model's decoder blocks, shared by every pruner.

As in the SparseGPT/Wanda references: capture the inputs of block 0 with every argument the model passes it
(hidden states, attention mask, position ids, rotary ``position_embeddings``...), then for each block in turn
gather statistics on the dense block, let the pruner prune it, and re-run the pruned block to produce the
next block's inputs. The model may stay on CPU; only the block being processed visits ``device``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruners.registry import ModelLayout, get_weight, layout

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover
    Cache = ()


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's inputs are known."""


@dataclass
class Batch:
    """One batch of block inputs: the hidden states plus the rest of the call, replayed verbatim."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Cache):
        return None  # never replay a KV cache: blocks must see each batch fresh
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, norms, rotary, head)."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)


def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device | str,
                   lay: ModelLayout | None = None) -> list[Batch]:
    """Run the model up to block 0 for each batch of ``ids`` and record that block's full call."""
    lay = lay or layout(model)
    home = next(model.parameters()).device
    _move_outside_blocks(model, lay.blocks, device)
    batches: list[Batch] = []

    def hook(_module, args, kwargs):
        batches.append(Batch(args[0].detach(), _to(args[1:], device), _to(kwargs, device)))
        raise _Captured

    handle = lay.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
        _move_outside_blocks(model, lay.blocks, home)
    return batches


def run_block(block: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """Replay ``block`` on every batch; returns the output hidden states."""
    outs = []
    with torch.no_grad():
        for b in batches:
            out = block(b.hidden, *b.args, **b.kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@contextmanager
def block_on(block: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Temporarily move one block to ``device`` and back."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


class InputStats:
    """Running statistics of a linear layer's inputs, accumulated in fp32 (or fp64) over calibration tokens.

    ``sum`` and ``sq`` are the per-input-column sums of x and x² (Wanda's norm; with ``sum``, FLAP's mean and
    variance), ``xtx`` the full XᵀX (SparseGPT's Hessian, when ``full``), ``nseq`` and ``ntok`` the sequences and
    tokens seen. Sums make the result independent of how sequences are batched.
    ``extra`` is a weight-shaped statistic the pruner computed beforehand on the whole dense model (GBLM's gradient
    norms), or None.
    """

    def __init__(self, columns: int, full: bool, dtype: torch.dtype = torch.float32, device=None,
                 extra: torch.Tensor | None = None):
        self.sum = torch.zeros(columns, dtype=dtype, device=device)
        self.sq = torch.zeros(columns, dtype=dtype, device=device)
        self.xtx = torch.zeros(columns, columns, dtype=dtype, device=device) if full else None
        self.nseq = 0
        self.ntok = 0
        self.extra = extra

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs shaped (batch, tokens, columns) or (tokens, columns)."""
        nseq = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.sq.dtype)
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.t() @ x
        self.nseq += nseq
        self.ntok += x.shape[0]

    @property
    def norm_sq(self) -> torch.Tensor:
        """Wanda's s_j: mean over sequences of the token-summed x_j²."""
        return self.sq / max(self.nseq, 1)

    @property
    def mean(self) -> torch.Tensor:
        """Mean input of every column over calibration tokens (FLAP's bias compensation)."""
        return self.sum / max(self.ntok, 1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance of every column's input over calibration tokens (FLAP's fluctuation)."""
        return ((self.sq - self.ntok * self.mean ** 2) / max(self.ntok - 1, 1)).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = (2/N) Σ XᵀX over the N calibration sequences."""
        if self.xtx is None:
            raise RuntimeError("full input statistics were not collected")
        return 2.0 * self.xtx / max(self.nseq, 1)


@contextmanager
def collect_stats(modules: dict[str, nn.Module], full: bool, dtype: torch.dtype = torch.float32,
                  extra: Mapping[str, torch.Tensor] | None = None) -> Iterator[dict[str, InputStats]]:
    """Hook ``modules`` so every forward pass adds its inputs to one ``InputStats`` per module (carrying the
    module's entry of ``extra``, if any)."""
    extra = extra or {}
    stats = {name: InputStats(get_weight(m).shape[1], full, dtype, m.weight.device, extra.get(name))
             for name, m in modules.items()}
    handles = [m.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add(inp[0].detach()))
               for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


BlockVisitor = Callable[[int, nn.Module, list[Batch]], None]


def walk(model: nn.Module, ids: torch.Tensor, visit: BlockVisitor, device: torch.device | str = "cpu",
         batch_size: int = 8, offload: torch.device | str | None = None) -> None:
    """Visit every decoder block with its (already propagated) inputs, then propagate through it.

    ``visit(i, block, batches)`` runs with block ``i`` on ``device``; it may gather statistics and prune the
    block in place. The block's outputs after ``visit`` returns (i.e. of the pruned block) feed block ``i+1``.
    Hidden states between blocks are kept on ``offload`` (default: ``device``).
    """
    lay = layout(model)
    offload = offload or device
    batches = capture_inputs(model, ids, batch_size, device, lay)
    for b in batches:
        b.hidden = b.hidden.to(offload)
    for i, block in enumerate(lay.blocks):
        with block_on(block, device):
            for b in batches:
                b.hidden = b.hidden.to(device)
            visit(i, block, batches)
            outs = run_block(block, batches)
            for b, out in zip(batches, outs):
                b.hidden = out.to(offload)
