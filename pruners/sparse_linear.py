"""The sparse linear layer of AST (Adaptive Sparse Trainer): y = (W⊙M)x + b with a straight-through gradient.

The dense weight keeps training (the gradient of W⊙M reaches every entry of W, pruned ones included), the mask is
re-selected from the current dense weights every few optimizer steps, and annealed SR-STE adds λ(t)(1−M)⊙W to the
gradient so that pruned weights decay (the paper's sign). Masks follow the repository convention: True = pruned,
stored in ``nn.Linear`` layout (out x in) whatever the wrapped module (GPT-2's ``Conv1D`` holds the transpose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pruners.masks import Target, select
from pruners.registry import Conv1D
from prunesearch.safety import UserError

METRICS = ("magnitude", "wanda")


class _MaskSTE(torch.autograd.Function):
    """Forward W⊙(¬pruned); backward passes the gradient through unmasked (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return weight * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SparseLinear(nn.Module):
    """Wraps an ``nn.Linear`` or ``Conv1D`` (same parameters, no copy) and multiplies its weight by a mask.

    ``norm_sq`` (Wanda's per-input-column s_j, static) is kept when the mask metric is Wanda. An optional SLoRB
    branch (``pruners.slorb.SLoRB``) adds its output to the layer's.
    """

    def __init__(self, base: nn.Module, target: Target, metric: str = "magnitude",
                 norm_sq: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"SparseLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if metric not in METRICS:
            raise UserError(f"mask metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "wanda" and norm_sq is None:
            raise ValueError("the wanda mask metric needs the input norms (norm_sq)")
        self.base = base
        self.target = target
        self.metric = metric
        self.slorb: nn.Module | None = None
        self.transposed = isinstance(base, Conv1D)
        rows, cols = self.dense_weight().shape
        self.register_buffer("mask", torch.zeros(rows, cols, dtype=torch.bool, device=base.weight.device))
        if norm_sq is not None:
            self.register_buffer("norm_sq", norm_sq.to(base.weight.device, torch.float32))
        else:
            self.norm_sq = None
        self.refresh()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight in ``nn.Linear`` layout (a view, no copy)."""
        w = self.base.weight
        return w.t() if self.transposed else w

    def _native(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t

    def score(self) -> torch.Tensor:
        """|W| (magnitude) or |W|·√s (static Wanda) of the current dense weights, ``nn.Linear`` layout."""
        score = self.dense_weight().detach().abs().float()
        if self.metric == "wanda":
            score = score * self.norm_sq.sqrt().unsqueeze(0)
        return score

    @torch.no_grad()
    def refresh(self) -> int:
        """Re-select the mask from the current dense weights; returns how many entries changed (flips)."""
        new = select(self.score(), self.target, per_row=True)
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        return flips

    def masked_weight(self) -> torch.Tensor:
        """W⊙M in the module's own layout, differentiable straight through to W."""
        keep = self._native(~self.mask).to(self.base.weight.dtype)
        return _MaskSTE.apply(self.base.weight, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.masked_weight()
        if self.transposed:  # as Conv1D computes it
            out = torch.addmm(self.base.bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
        else:
            out = F.linear(x, w, self.base.bias)
        if self.slorb is not None:
            out = out + self.slorb(x)
        return out

    @torch.no_grad()
    def add_srste_decay(self, lam: float) -> None:
        """SR-STE: add λ(1−M)⊙W to the weight's gradient (pruned weights decay towards zero)."""
        if lam == 0.0 or self.base.weight.grad is None:
            return
        w = self.base.weight
        w.grad.add_(w * self._native(self.mask).to(w.dtype), alpha=lam)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The wrapped module with W⊙M written into its weight (pattern exact), for saving or plain inference."""
        self.base.weight.masked_fill_(self._native(self.mask), 0.0)
        return self.base


def srste_lambda(step: int, total_steps: int, lam_max: float, ramp: float) -> float:
    """Annealed SR-STE strength: 0 at step 0, linear up to ``lam_max`` at ``ramp``·total steps, then constant."""
    ramp_steps = ramp * total_steps
    if ramp_steps <= 0:
        return lam_max
    return lam_max * min(1.0, step / ramp_steps)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def sparsify(model: nn.Module, targets: dict[str, Target], metric: str = "magnitude",
             norms: dict[str, torch.Tensor] | None = None) -> dict[str, SparseLinear]:
    """Replace every projection with a non-zero target by a ``SparseLinear`` (in place); returns them by name."""
    wrapped = {}
    for name, target in targets.items():
        if target.sparsity == 0.0:
            continue
        parent, child = _parent(model, name)
        layer = SparseLinear(getattr(parent, child), target, metric, norms[name] if norms is not None else None)
        setattr(parent, child, layer)
        wrapped[name] = layer
    if not wrapped:
        raise UserError("every layer's target sparsity is 0: nothing to train sparse")
    return wrapped


def unsparsify(model: nn.Module, layers: dict[str, SparseLinear]) -> None:
    """Put the original modules back with their masks applied (the model becomes a plain HF model again)."""
    for name, layer in layers.items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.export())
