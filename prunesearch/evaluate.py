"""Measuring a (pruned) model: perplexity under the reference protocol and KL divergence to the dense model."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Cut a (1, N) token stream into non-overlapping windows of ``seqlen``; the remainder is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"evaluation data has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def window_nll(model: nn.Module, wins: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL of every window (float64), each window scored on its own."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, wins.shape[0], batch_size):
        batch = wins[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(batch.shape[0], -1).mean(1).double().cpu())
    return torch.cat(out)


def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int = 8,
               limit: int | None = None) -> float:
    """PPL = exp(mean over windows of the mean token NLL), as SparseGPT/Wanda report it."""
    return math.exp(window_nll(model, windows(ids, seqlen, limit), batch_size).mean().item())


class DenseReference:
    """The dense model's next-token log-probabilities on fixed tokens, computed once and reused.

    With ``topk`` only the k most likely tokens per position are kept plus the remaining mass, and the KL is the
    one between the two distributions coarsened to those k+1 outcomes (a lower bound of the full KL that keeps
    memory bounded for large vocabularies).
    """

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor | None = None):
        self.ids, self.logprobs, self.indices = ids, logprobs, indices
        self.probs = logprobs.exp()
        self.neg_entropy = (self.probs * logprobs).nan_to_num().sum(-1)

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, ids: torch.Tensor, batch_size: int = 8, topk: int | None = None
                ) -> DenseReference:
        device = next(model.parameters()).device
        chunks, idx_chunks = [], []
        for start in range(0, ids.shape[0], batch_size):
            logp = F.log_softmax(model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
                                 .logits.float(), dim=-1)
            if topk:
                vals, idx = logp.topk(topk, dim=-1)
                rest = torch.log1p(-vals.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
                chunks.append(torch.cat([vals, rest], -1).cpu())
                idx_chunks.append(idx.cpu())
            else:
                chunks.append(logp.cpu())
        return cls(ids, torch.cat(chunks), torch.cat(idx_chunks) if topk else None)

    def save(self, path: str | Path) -> None:
        tensors = {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous()}
        if self.indices is not None:
            tensors["indices"] = self.indices.contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path) -> DenseReference:
        t = load_file(str(path))
        return cls(t["ids"], t["logprobs"], t.get("indices"))

    def kl_terms(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-token KL(P_dense ‖ P_model) for the reference rows ``rows`` given the model's logits on them.

        Full vocabulary: KL = Σp·log p − Σp·z + logsumexp(z), with Σp·log p precomputed, so a trial costs one
        logsumexp and one dot product over the vocabulary on top of its forward pass.
        """
        z = logits.float()
        if self.indices is None:
            p = self.probs[rows].to(z.device)
            return self.neg_entropy[rows].to(z.device) - torch.einsum("btv,btv->bt", p, z) + torch.logsumexp(z, dim=-1)
        logq = F.log_softmax(z, dim=-1)
        logp = self.logprobs[rows].to(logq.device)
        q_top = logq.gather(-1, self.indices[rows].to(logq.device))
        q_rest = torch.log1p(-q_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
        logq_k = torch.cat([q_top, q_rest], -1)
        return (logp.exp() * (logp - logq_k)).sum(-1)

    @torch.no_grad()
    def kl_sum(self, model: nn.Module, start: int, stop: int, batch_size: int = 8) -> tuple[float, int]:
        """Sum of per-token KL(P_dense ‖ P_model) over reference sequences [start, stop), and the token count."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for lo in range(start, stop, batch_size):
            rows = slice(lo, min(lo + batch_size, stop))
            terms = self.kl_terms(model(input_ids=self.ids[rows].to(device), use_cache=False).logits, rows)
            total += terms.double().sum().item()
            count += terms.numel()
        return total, count

    def kl(self, model: nn.Module, batch_size: int = 8, limit: int | None = None) -> float:
        """Mean over tokens of KL(P_dense ‖ P_model) on the first ``limit`` sequences (all by default)."""
        n = self.ids.shape[0] if limit is None else min(limit, self.ids.shape[0])
        total, count = self.kl_sum(model, 0, n, batch_size)
        return total / count


def reference_key(model_source: str, ids: torch.Tensor, topk: int | None) -> str:
    """A cache key for a dense reference: the model's weights location/mtime and the exact token ids."""
    h = hashlib.sha256()
    path = Path(model_source)
    h.update(model_source.encode())
    if path.exists():
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(ids.numpy().tobytes())
    h.update(str(topk).encode())
    return h.hexdigest()[:16]
