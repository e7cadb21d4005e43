"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with weight reconstruction, optionally joint 4-bit
quantization (GPTQ grid). Faithful to the reference except that exactly ⌊p·r·B⌋ weights are pruned per column
block (the reference's ``<=`` threshold prunes one more plus ties).
"""

from __future__ import annotations

import logging

import torch

from pruners.masks import Target, layer_mask
from pruners.walker import InputStats

log = logging.getLogger(__name__)


class MinMaxQuantizer:
    """Per-output-channel asymmetric round-to-nearest grid, fitted once on the dense weight (GPTQ's default)."""

    def __init__(self, bits: int, weight: torch.Tensor):
        self.maxq = 2**bits - 1
        xmin = weight.min(dim=1).values.clamp(max=0)
        xmax = weight.max(dim=1).values.clamp(min=0)
        flat = xmin == xmax
        xmin[flat], xmax[flat] = -1.0, 1.0
        self.scale = (xmax - xmin) / self.maxq
        self.zero = torch.round(-xmin / self.scale)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize column(s) ``w`` (shape r or r x k) onto the grid; zero stays exactly zero."""
        scale, zero = self.scale, self.zero
        if w.dim() == 2:
            scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return scale * (q - zero)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float, retries: int = 4) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H); more damping if H is not PD."""
    for attempt in range(retries + 1):
        damp = percdamp * (10**attempt) * torch.mean(torch.diag(hessian))
        h = hessian.clone()
        h.diagonal().add_(damp)
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(hinv, upper=True), percdamp * 10**attempt
        except torch.linalg.LinAlgError:
            log.warning("Hessian not positive definite at damping %.3g; retrying with more", percdamp * 10**attempt)
    raise RuntimeError(f"Hessian stayed non positive definite up to damping {percdamp * 10**retries:g}")


def prepare(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float, torch.Tensor]:
    """What SparseGPT needs from H, independent of the target: the upper Cholesky factor of the damped inverse
    (dead inputs, H_jj = 0, set to 1), the damping used and the dead-input mask. Reusable across targets."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hinv, damp = _inverse_cholesky(H, percdamp)
    return Hinv, damp, dead


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, target: Target, blocksize: int = 128,
              percdamp: float = 0.01, wbits: int | None = None, mask: torch.Tensor | None = None,
              prepared: tuple[torch.Tensor, float, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune (and optionally quantize) ``weight`` (out x in) given H = (2/N)ΣXXᵀ.

    Returns the new weight, the mask (True = pruned) and details (damping used). A given ``mask`` is applied
    as is instead of being selected, which is what the equivalence tests use; ``prepared`` (from ``prepare``)
    skips the inversion when one H serves several targets.
    """
    Hinv, damp, dead = prepared or prepare(hessian, percdamp)
    W = weight.to(hessian.dtype).clone()
    rows, cols = W.shape
    W[:, dead] = 0
    quant = MinMaxQuantizer(wbits, W) if wbits else None
    pruned = torch.zeros_like(W, dtype=torch.bool)
    n, m = target.n, target.m
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if mask is not None:
            mask1 = mask[:, i1:i2].clone()
        elif m == 0:
            mask1 = layer_mask(W1**2 / d.unsqueeze(0) ** 2, target.sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if mask is None and m and i % m == 0 and n:
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            if quant is not None:
                q = quant(q).masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W.to(weight.dtype), pruned, {"damping": damp}


class SparseGPT:
    name = "sparsegpt"
    stats = "hessian"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, wbits: int | None = None):
        self.blocksize, self.percdamp, self.wbits = blocksize, percdamp, wbits

    def prune(self, weight: torch.Tensor, stats: InputStats, target: Target) -> torch.Tensor:
        if target.sparsity == 0.0 and not self.wbits:
            return weight
        return sparsegpt(weight, stats.hessian, target, self.blocksize, self.percdamp, self.wbits)[0]
