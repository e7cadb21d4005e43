"""Measuring a (pruned) model: perplexity under the reference protocol and KL divergence to the dense model."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from prunesearch.safety import UserError


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Cut a (1, N) token stream into non-overlapping windows of ``seqlen``; the remainder is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise UserError(f"evaluation data has {ids.numel()} tokens, fewer than one window of {seqlen}")
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


def head_split(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The network up to the final hidden state and the linear LM head, for models whose logits are head(h)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or base is model:
        return None
    return base, head


class DenseReference:
    """The dense model's next-token distribution on fixed tokens, computed once and reused for KL.

    KL(P‖Q) = Σp·log p − Σp·z + logsumexp(z) for the student's logits z. When z = W·h + b is a linear head on the
    final hidden state h (checked on the first batch), Σp·z = h·(Σp·W) + Σp·b, so the reference keeps only the
    expected output embedding ē = Σp·W per token (hidden size, not vocabulary size) and the constant
    Σp·log p − Σp·b: a trial then costs one logsumexp over its own logits and a dot product of hidden size.
    Otherwise the full log-probabilities are kept. With ``topk`` only the k most likely tokens per position are
    kept plus the remaining mass, and the KL is the one between the distributions coarsened to those k+1
    outcomes (a lower bound of the full KL that keeps memory bounded for large vocabularies).
    """

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                 expected: torch.Tensor | None = None, constant: torch.Tensor | None = None):
        self.ids, self.logprobs, self.indices = ids, logprobs, indices
        self.expected, self.constant = expected, constant
        if logprobs is not None and indices is None:
            self.probs = logprobs.exp()
            self.constant = (self.probs * logprobs).nan_to_num().sum(-1)

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, ids: torch.Tensor, batch_size: int = 8, topk: int | None = None
                ) -> DenseReference:
        device = next(model.parameters()).device
        split = None if topk else head_split(model)
        if split is not None:
            first = ids[:batch_size].to(device)
            z = split[1](split[0](input_ids=first, use_cache=False).last_hidden_state)
            if not torch.allclose(z, model(input_ids=first, use_cache=False).logits, rtol=1e-4, atol=1e-4):
                split = None  # logits are not a plain linear map of the final hidden state (scaling, soft-capping)
        chunks, indices, expected, constant = [], [], [], []
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            if split is not None:
                base, head = split
                h = base(input_ids=batch, use_cache=False).last_hidden_state
                logp = F.log_softmax(head(h).float(), dim=-1)
                p = logp.exp()
                const = (p * logp).nan_to_num().sum(-1)
                if head.bias is not None:
                    const = const - p @ head.bias.float()
                expected.append((p @ head.weight.float()).cpu())
                constant.append(const.cpu())
                continue
            logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
            if topk:
                vals, idx = logp.topk(topk, dim=-1)
                rest = torch.log1p(-vals.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
                chunks.append(torch.cat([vals, rest], -1).cpu())
                indices.append(idx.cpu())
            else:
                chunks.append(logp.cpu())
        if split is not None:
            return cls(ids, expected=torch.cat(expected), constant=torch.cat(constant))
        return cls(ids, torch.cat(chunks), torch.cat(indices) if topk else None)

    def save(self, path: str | Path) -> None:
        tensors = {"ids": self.ids, "logprobs": self.logprobs, "indices": self.indices, "expected": self.expected,
                   "constant": self.constant if self.expected is not None else None}
        save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> DenseReference:
        t = load_file(str(path))
        return cls(t["ids"], t.get("logprobs"), t.get("indices"), t.get("expected"), t.get("constant"))

    @classmethod
    def cached(cls, path: str | Path, model: nn.Module | Callable[[], nn.Module], ids: torch.Tensor,
               batch_size: int = 8) -> DenseReference:
        """The reference saved at ``path``, or computed from ``model`` (a module, or a loader called only when
        nothing is saved) and saved there; the dense pass is paid once per model and token set. Written
        atomically; an unreadable file is recomputed; concurrent processes compute it once."""
        from prunesearch.files import load_or_build

        def build() -> DenseReference:
            return cls.compute(model if isinstance(model, nn.Module) else model(), ids, batch_size)

        return load_or_build(Path(path), cls.load, build, lambda ref, tmp: ref.save(tmp), "dense reference")

    def kl_terms(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-token KL(P_dense ‖ P_model) for the reference rows ``rows`` given the model's logits on them
        (full or top-k reference; the full one uses the precomputed Σp·log p)."""
        z = logits.float()
        if self.indices is None:
            p = self.probs[rows].to(z.device)
            return self.constant[rows].to(z.device) - torch.einsum("btv,btv->bt", p, z) + torch.logsumexp(z, dim=-1)
        logq = F.log_softmax(z, dim=-1)
        logp = self.logprobs[rows].to(logq.device)
        q_top = logq.gather(-1, self.indices[rows].to(logq.device))
        q_rest = torch.log1p(-q_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
        logq_k = torch.cat([q_top, q_rest], -1)
        return (logp.exp() * (logp - logq_k)).sum(-1)

    def _batch_forward(self, model: nn.Module, rows: slice, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's float logits on the reference rows ``rows`` and their per-token KL to the dense model."""
        batch = self.ids[rows].to(device)
        if self.expected is None:
            logits = model(input_ids=batch, use_cache=False).logits.float()
            return logits, self.kl_terms(logits, rows)
        split = head_split(model)
        if split is None:
            raise UserError("this reference needs a model whose logits are a linear head on its final hidden state")
        h = split[0](input_ids=batch, use_cache=False).last_hidden_state
        logits = split[1](h).float()
        cross = torch.einsum("bth,bth->bt", h.float(), self.expected[rows].to(device))
        return logits, self.constant[rows].to(device) - cross + torch.logsumexp(logits, dim=-1)

    @torch.no_grad()
    def kl_rows(self, model: nn.Module, start: int, stop: int, batch_size: int = 8) -> tuple[torch.Tensor, int]:
        """Per-sequence sums of token KL(P_dense ‖ P_model) over reference sequences [start, stop) (float64) and
        the tokens per sequence: their spread tells a real difference between two models from sampling noise."""
        device = next(model.parameters()).device
        sums, tokens = [], 0
        for lo in range(start, stop, batch_size):
            _, terms = self._batch_forward(model, slice(lo, min(lo + batch_size, stop)), device)
            sums.append(terms.double().sum(1).cpu())
            tokens = terms.shape[1]
        return (torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)), tokens

    def kl_sum(self, model: nn.Module, start: int, stop: int, batch_size: int = 8) -> tuple[float, int]:
        """Sum of per-token KL(P_dense ‖ P_model) over reference sequences [start, stop), and the token count."""
        sums, tokens = self.kl_rows(model, start, stop, batch_size)
        return float(sums.sum()), sums.numel() * tokens

    @torch.no_grad()
    def nll_and_kl(self, model: nn.Module, batch_size: int = 8) -> tuple[torch.Tensor, float]:
        """Per-sequence mean next-token NLL (as ``window_nll``) and the mean token KL to the dense model, from one
        forward pass over the reference sequences instead of two: a report scores both on the same windows."""
        device = next(model.parameters()).device
        nll, total, count = [], 0.0, 0
        for lo in range(0, self.ids.shape[0], batch_size):
            rows = slice(lo, min(lo + batch_size, self.ids.shape[0]))
            logits, terms = self._batch_forward(model, rows, device)
            target = self.ids[rows, 1:].to(device)
            tokens = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     reduction="none")
            nll.append(tokens.view(target.shape).mean(1).double().cpu())
            total += terms.double().sum().item()
            count += terms.numel()
        return torch.cat(nll), total / count

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
    weights = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.exists() else []
    for f in weights:
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(ids.numpy().tobytes())
    h.update(str(topk).encode())
    return h.hexdigest()[:16]
