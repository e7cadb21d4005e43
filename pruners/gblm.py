"""GBLM-Pruner (Das et al., 2023): Wanda's score plus a gradient term from the dense model's language-model loss.

Score = |W|·√s + α·|W|·G, with s Wanda's input norm and G the ℓ2 (default) or ℓ1 norm over calibration
sequences of the scaled per-sequence gradients scale·∂loss/∂W (scale 100 as the reference, which then adds the
two terms unweighted: α = 1). Selection is Wanda's: per output row, N:M per row. The gradients come from one pass
over the dense model, one sequence at a time, and are cached as safetensors so later runs and the search reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pruners.registry import layout, linear_layout
from pruners.walker import InputStats
from pruners.wanda import Wanda
from prunesearch.safety import UserError

log = logging.getLogger(__name__)

NORMS = ("l2", "l1")
REDUCTIONS = (*NORMS, "mean")  # what gradient_pass accumulates: GBLM's norms, or the plain mean (Taylor importance)
SCALE = 100.0


def gradient_pass(model: nn.Module, calib_ids: torch.Tensor, norm: str = "l2", scale: float = SCALE,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """G per prunable projection (``nn.Linear`` layout, fp32, on CPU): the ``norm`` over calibration sequences of
    ``scale`` times the gradient of that sequence's causal-LM loss (labels = inputs, mean over tokens); ``norm``
    ``mean`` averages the signed gradients instead, which gives ``scale`` times the gradient of the mean loss.

    The model runs in eval mode (no dropout, so the pass is deterministic; LLaMA-style models have none anyway) on
    ``device`` and returns where it was. Only projection weights require grad. Accumulation is streamed: as soon
    as backward has produced one weight's gradient, a hook folds it into that weight's fp32 accumulator on CPU and
    frees it, so the device never holds more than the gradients in flight, and the CPU holds one fp32 tensor per
    projection weight.
    """
    if norm not in REDUCTIONS:
        raise UserError(f"gradient reduction must be one of {', '.join(REDUCTIONS)}, got {norm!r}")
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 1:
        raise ValueError("GBLM's gradient pass needs calibration ids shaped (sequences, tokens)")
    lay = layout(model)
    modules = {n: m for block in lay.projections for n, m in block.items()}
    acc = {n: torch.zeros(linear_layout(m, m.weight).shape, dtype=torch.float32) for n, m in modules.items()}
    home = next(model.parameters()).device
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}

    def fold(name: str, module: nn.Module):
        def hook(param: torch.Tensor) -> None:
            g = linear_layout(module, param.grad).float() * scale
            acc[name] += (g * g if norm == "l2" else g.abs() if norm == "l1" else g).cpu()
            param.grad = None
        return hook

    handles = []
    try:
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in modules.items():
            module.weight.requires_grad_(True)
            handles.append(module.weight.register_post_accumulate_grad_hook(fold(name, module)))
        with torch.enable_grad():
            for seq in calib_ids:
                ids = seq.unsqueeze(0).to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
            p.grad = None
        model.to(home).train(was_training)
    if norm == "mean":
        return {n: a / calib_ids.shape[0] for n, a in acc.items()}
    return {n: a.sqrt() if norm == "l2" else a for n, a in acc.items()}


def _fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's name, shape, dtype and bytes: the exact model the gradients belong to."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gradient_key(model: nn.Module, calib_ids: torch.Tensor, norm: str, scale: float) -> dict[str, str]:
    """What a cached gradient file depends on: the model's weights, the exact calibration ids (data source,
    tokenizer, sample count, sequence length and seed all end up in them), the norm and the scale."""
    ids = calib_ids.to(torch.int64).cpu().contiguous()
    return {
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)),
        "weights_sha256": _fingerprint(model),
        "calib_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "nsamples": str(ids.shape[0]), "seqlen": str(ids.shape[1]), "norm": norm, "scale": repr(float(scale)),
    }


def cached_gradients(model: nn.Module, calib_ids: torch.Tensor, norm: str = "l2", scale: float = SCALE,
                     device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], Path, float | None]:
    """``gradient_pass``'s statistics (norms, or the mean for ``norm`` ``mean``) from the cache, or from one pass
    saved there; returns them, the file and the pass's wall time (None on a cache hit)."""
    from prunesearch.cache import cache_dir

    key = gradient_key(model, calib_ids, norm, scale)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir("gblm") / f"gradients-{norm}-{digest}.safetensors"
    names = layout(model).projection_names()
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if f.metadata() == key and set(f.keys()) == set(names):
                return {n: f.get_tensor(n) for n in names}, path, None
        log.warning("ignoring %s: it does not match this model and calibration set", path)
    start = time.perf_counter()
    grads = gradient_pass(model, calib_ids, norm, scale, device)
    seconds = time.perf_counter() - start
    tmp = path.with_suffix(".tmp")
    save_file({n: g.contiguous() for n, g in grads.items()}, str(tmp), metadata=key)
    tmp.replace(path)
    log.info("gradient pass (%s) over %d sequences: %.1fs, cached in %s", norm, calib_ids.shape[0], seconds, path)
    return grads, path, seconds


class GBLM(Wanda):
    """Wanda's score plus α·|W|·G; G are gradient norms handed over as ``InputStats.extra``."""

    name = "gblm"
    stats = "norms"

    def __init__(self, alpha: float = 1.0, norm: str = "l2", scale: float = SCALE):
        if norm not in NORMS:
            raise UserError(f"GBLM norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if not alpha >= 0 or alpha == float("inf"):
            raise UserError(f"GBLM alpha must be a finite number >= 0, got {alpha}")
        if not scale > 0 or scale == float("inf"):
            raise UserError(f"GBLM gradient scale must be a finite positive number, got {scale}")
        self.alpha, self.norm, self.scale = float(alpha), norm, float(scale)
        self.cache_file: Path | None = None
        self.gradient_seconds: float | None = None

    def extra_stats(self, model: nn.Module, calib_ids: torch.Tensor, device: torch.device | str = "cpu"
                    ) -> dict[str, torch.Tensor]:
        """The per-projection gradient norms G of the dense ``model`` (cached; computed once per key)."""
        grads, self.cache_file, self.gradient_seconds = cached_gradients(model, calib_ids, self.norm, self.scale,
                                                                         device)
        return grads

    def score(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        if stats.extra is None:
            raise ValueError("GBLM needs the gradient norms of the layer (the driver gets them from extra_stats)")
        grad = stats.extra.to(weight.device, torch.float32)
        return super().score(weight, stats) + self.alpha * weight.abs().float() * grad

    def details(self) -> dict:
        """What a report records about this run: α, norm, scale and the gradient cache file."""
        return {"alpha": self.alpha, "norm": self.norm, "scale": self.scale,
                "gradient_cache": str(self.cache_file) if self.cache_file else None,
                "gradient_pass_s": self.gradient_seconds}
