"""SparseLLM (Bai et al., NeurIPS 2024): global pruning of each block's FFN through auxiliary variables.

Attention projections are pruned with SparseGPT. For the FFN, with X its input, Y its dense output, z the up
projection's pre-activation (s the gate's, when gated) and p the down projection's input, the block objective

    L = α‖z − W1·X − b1‖² (+ α‖s − Wg·X‖²) + γ‖p − a‖² + β‖Y − W2·p − b2‖²,   a = act(z)  or  act(s)⊙z,

is lowered by alternating T times: (t > 0) refit each weight densely by least squares on the current auxiliary
variables and prune it again with SparseGPT (fresh mask); then update p in closed form and z (and s) element-wise.
With T = 1 the weights are exactly SparseGPT's. Departures from the reference code (github:BaiTheBest/SparseLLM):

- its pruning step adds the damping in place to the stored Hessian of X, which is reused every iteration, so the
  input-side projections are pruned with ever more damping (about t+1 times the nominal at iteration t); here
  every prune damps an untouched Hessian;
- OPT's fc2 refit is a least-squares solve like every other refit (the reference takes 10 small gradient steps);
- the z-update is the exact minimizer for any α, γ (the reference's gated formula assumes α = γ), and any
  element-wise activation is supported through a bracketed 1-D solve (closed form for ReLU);
- a refit-and-prune that would raise its term of L is rejected (the previous sparse weight is kept) and gate steps
  that raise an element's objective are not taken, so L never increases; rejections are reported;
- auxiliary variables live in the model dtype, and every product over tokens is accumulated over token chunks
  (the reference materializes pinv(X), pinv(p) and several token-sized temporaries).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from pruners.masks import Target
from pruners.registry import ModelLayout, get_weight, set_weight
from pruners.sparsegpt import sparsegpt
from pruners.walker import Batch, collect_stats, run_block
from prunesearch.safety import UserError

log = logging.getLogger(__name__)

Activation = Callable[[torch.Tensor], torch.Tensor]
LAYER_SETS = ("all", "first-half")


def relu_z_update(m: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z α(z − m)² + γ(p − relu(z))² element-wise: the best of the minimizers on z ≥ 0 and on z ≤ 0."""
    pos = ((alpha * m + gamma * p) / (alpha + gamma)).clamp(min=0)
    neg = m.clamp(max=0)

    def f(z):
        return alpha * (z - m) ** 2 + gamma * (p - z.clamp(min=0)) ** 2

    return torch.where(f(pos) <= f(neg), pos, neg)


def scalar_z_update(act: Activation, m: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float,
                    grid: int = 16, span: float = 6.0, spacing: float = 0.25, refine: int = 20) -> torch.Tensor:
    """argmin_z α(z − m)² + γ(p − act(z))² element-wise for any activation (GELU...).

    The minimizer lies within r = √(γ/α)·|p − act(m)| of m (its objective cannot exceed the value at m). Two grids
    find the best basin: ``grid`` cells over that bracket, and a fixed grid of ``spacing`` over [−span, span] where
    activations bend (a narrow basin such as GELU's dip can hide between bracket points); golden-section search then
    refines around the best point of each grid, and the best value found wins.
    """
    def f(z):
        return alpha * (z - m) ** 2 + gamma * (p - act(z)) ** 2

    radius = math.sqrt(gamma / alpha) * (p - act(m)).abs()
    step = 2 * radius / grid
    best, fbest = m.clone(), f(m)
    candidates = ((step, (m - radius + k * step for k in range(grid + 1))),
                  (spacing, (torch.full_like(m, v) for v in torch.arange(-span, span + spacing / 2, spacing).tolist())))
    for width, points in candidates:
        z0, f0 = None, None
        for z in points:
            fz = f(z)
            if z0 is None:
                z0, f0 = z, fz
            else:
                better = fz < f0
                z0, f0 = torch.where(better, z, z0), torch.where(better, fz, f0)
        z1, f1 = _golden(f, z0 - width, z0 + width, refine)
        for z, fz in ((z0, f0), (z1, f1)):
            better = fz < fbest
            best, fbest = torch.where(better, z, best), torch.where(better, fz, fbest)
    return best


def _golden(f: Activation, a: torch.Tensor, b: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise golden-section search for a minimum of ``f`` on [a, b]; returns the point and its value."""
    invphi = (math.sqrt(5) - 1) / 2
    c, d = b - invphi * (b - a), a + invphi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        left = fc < fd
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        x = torch.where(left, b - invphi * (b - a), a + invphi * (b - a))
        fx = f(x)
        c, d, fc, fd = (torch.where(left, x, d), torch.where(left, c, x),
                        torch.where(left, fx, fd), torch.where(left, fc, fx))
    return torch.where(fc < fd, c, d), torch.minimum(fc, fd)


def gated_z_update(m: torch.Tensor, gate: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z α(z − m)² + γ(p − gate·z)² element-wise (gate = act(s)): a quadratic in z."""
    return (alpha * m + gamma * gate * p) / (alpha + gamma * gate * gate)


def gate_update(act: Activation, s: torch.Tensor, m: torch.Tensor, z: torch.Tensor, p: torch.Tensor, alpha: float,
                gamma: float, lr: float, steps: int) -> torch.Tensor:
    """A few gradient steps on α(s − m)² + γ(p − act(s)·z)² element-wise; a step that raises an element's value
    is not taken."""
    def f(x):
        return alpha * (x - m) ** 2 + gamma * (p - act(x) * z) ** 2

    for _ in range(steps):
        with torch.enable_grad():
            x = s.detach().requires_grad_(True)
            fx = f(x)
            (grad,) = torch.autograd.grad(fx.sum(), x)
        cand = s - lr * grad
        s = torch.where(f(cand) < fx.detach(), cand, s)
    return s


class _Capture:
    """Forward hooks writing every calibration token's FFN input X, pre-activations z (and s), down-projection
    input p and output Y into buffers allocated once, in the model dtype."""

    def __init__(self, modules: dict[str, nn.Module], tokens: int, dtype: torch.dtype, device: torch.device):
        width_in, width_mid = get_weight(modules["up"]).shape[1], get_weight(modules["up"]).shape[0]
        self.buf = {"X": width_in, "z": width_mid, "p": width_mid, "Y": get_weight(modules["down"]).shape[0]}
        if "gate" in modules:
            self.buf["s"] = width_mid
        self.buf = {k: torch.empty(tokens, w, dtype=dtype, device=device) for k, w in self.buf.items()}
        self.modules, self.offsets, self.handles = modules, {}, []

    def _write(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().reshape(-1, value.shape[-1])
        start = self.offsets.get(key, 0)
        self.buf[key][start:start + value.shape[0]] = value
        self.offsets[key] = start + value.shape[0]

    def __enter__(self) -> dict[str, torch.Tensor]:
        hooks = {"up": (("X", "z"),), "down": (("p", "Y"),), "gate": ((None, "s"),)}
        for role, module in self.modules.items():
            for inp_key, out_key in hooks[role]:
                def hook(_m, inp, out, inp_key=inp_key, out_key=out_key):
                    if inp_key:
                        self._write(inp_key, inp[0])
                    self._write(out_key, out)
                self.handles.append(module.register_forward_hook(hook))
        return self.buf

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class SparseLLM:
    """Block-level pruner: SparseGPT on attention, SparseLLM's alternating optimization on each FFN.

    ``alpha``, ``beta``, ``gamma`` weigh the pre-activation, output and activation terms of the objective. One
    default for every FFN kind: the reference's LLaMA value 5. For plain FFNs only their ratios matter here (all
    updates are exact minimizers), so OPT's reference value 0.1 gives the same result; for gated FFNs α·``gate_lr``
    sets the gate step as in the reference. ``layers="first-half"`` optimizes only the first ⌊L/2⌋ blocks (as the
    paper's tables do) and prunes the others with plain SparseGPT.
    """

    name = "sparsellm"
    stats = "hessian"

    def __init__(self, iters: int = 4, alpha: float = 5.0, beta: float = 5.0, gamma: float = 5.0,
                 layers: str = "all", blocksize: int = 128, percdamp: float = 0.01, gate_steps: int = 2,
                 gate_lr: float = 0.01, chunk_tokens: int = 4096, solve_damp: float = 1e-6):
        if not isinstance(iters, int) or iters < 1:
            raise UserError(f"SparseLLM iterations must be an integer >= 1, got {iters!r}")
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not value > 0 or not math.isfinite(value):
                raise UserError(f"SparseLLM {key} must be positive and finite, got {value!r}")
        if layers not in LAYER_SETS:
            raise UserError(f"SparseLLM layers must be one of {', '.join(LAYER_SETS)}, got {layers!r}")
        self.iters, self.layers = iters, layers
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.blocksize, self.percdamp, self.solve_damp = blocksize, percdamp, solve_damp
        self.gate_steps, self.gate_lr, self.chunk_tokens = gate_steps, gate_lr, chunk_tokens
        self._blocks: dict[int, dict] = {}
        self._retries: list[dict] = []
        self._ffn: dict = {}

    def details(self) -> dict:
        """Hyperparameters used and, per block, the objective per iteration, the FFN output error and rejections."""
        return {"iters": self.iters, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "layers": self.layers, "gate_steps": self.gate_steps, "gate_lr": self.gate_lr,
                "percdamp": self.percdamp, "ffn": self._ffn, "blocks": self._blocks, "damping_retries": self._retries}

    def selected(self, index: int, num_blocks: int) -> bool:
        """Whether block ``index`` gets the joint FFN optimization (else plain SparseGPT)."""
        return self.layers == "all" or index < num_blocks // 2

    @torch.no_grad()
    def prune_block(self, index: int, block: nn.Module, batches: list[Batch], projections: dict[str, nn.Module],
                    targets: dict[str, Target], lay: ModelLayout) -> None:
        """Prune the touched ``projections`` of block ``index`` in place (called by ``prune_model``)."""
        if index == 0:
            self._blocks, self._retries = {}, []
            self._ffn = {"gated": lay.ffn is not None and lay.ffn.gate is not None, "activation": lay.activation}
        for b in batches:
            if not torch.isfinite(b.hidden).all():
                raise ValueError(f"sparsellm: block {index} received non-finite hidden states (from the block before)")
        names = lay.ffn_names(index)
        joint = self.selected(index, lay.num_blocks) and any(n in projections for n in names.values())
        modules = {role: lay.projections[index][n] for role, n in names.items()} if joint else {}
        tokens = sum(b.hidden.shape[0] * b.hidden.shape[1] for b in batches)
        nseq = sum(b.hidden.shape[0] for b in batches)
        dtype, device = batches[0].hidden.dtype, batches[0].hidden.device
        capture = _Capture(modules, tokens, dtype, device) if joint else None
        with collect_stats(projections, full=True) as stats:
            if capture is None:
                run_block(block, batches)
            else:
                with capture:
                    run_block(block, batches)
        for name, st in stats.items():
            if not torch.isfinite(st.xtx).all():
                raise ValueError(f"sparsellm: block {index} produced non-finite inputs to {name}")
        ffn_names = set(names.values()) if joint else set()
        for name, module in projections.items():
            if name not in ffn_names:
                set_weight(module, self._sparsegpt(index, name, get_weight(module).float(), stats[name].hessian,
                                                   targets[name]))
        if not joint:
            self._blocks[index] = {"mode": "sparsegpt"}
            return
        data = capture.buf
        for key, value in data.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"sparsellm: block {index}'s dense FFN produced non-finite values ({key})")
        prunable = {role: names[role] for role in modules if names[role] in projections}
        weights = self._optimize(index, modules, prunable, data, {r: stats[n].hessian for r, n in prunable.items()},
                                 {r: targets[n] for r, n in prunable.items()}, act_fn(lay.activation), nseq)
        for role in prunable:
            set_weight(modules[role], weights[role])

    def _sparsegpt(self, index: int, name: str, weight: torch.Tensor, hessian: torch.Tensor, target: Target
                   ) -> torch.Tensor:
        new, _, info = sparsegpt(weight, hessian, target, self.blocksize, self.percdamp)
        if info["damping"] != self.percdamp:
            self._retries.append({"block": index, "solve": f"sparsegpt {name}", "damping": info["damping"]})
        return new

    def _cholesky(self, gram: torch.Tensor, index: int, what: str, retries: int = 4) -> torch.Tensor:
        """Lower Cholesky factor of gram + λI, λ = solve_damp·mean(diag), ×10 per retry while not positive definite."""
        scale = gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
        for attempt in range(retries + 1):
            rel = self.solve_damp * 10**attempt
            factor, info = torch.linalg.cholesky_ex(gram + rel * scale * torch.eye(len(gram), device=gram.device,
                                                                                    dtype=gram.dtype))
            if info.item() == 0:
                if attempt:
                    self._retries.append({"block": index, "solve": what, "damping": rel})
                    log.warning("block %d %s: not positive definite, solved with damping %.3g", index, what, rel)
                return factor
        raise RuntimeError(f"sparsellm: block {index} {what}: matrix stayed non positive definite up to damping "
                           f"{self.solve_damp * 10**retries:g}")

    def _optimize(self, index: int, modules: dict[str, nn.Module], prunable: dict[str, str],
                  data: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], targets: dict[str, Target],
                  act: Activation, nseq: int) -> dict[str, torch.Tensor]:
        """Alternate refit-and-prune of the FFN weights with the auxiliary updates; returns the pruned weights."""
        W = {role: get_weight(m).float().clone() for role, m in modules.items()}
        bias = {role: (m.bias.detach().float() if getattr(m, "bias", None) is not None else None)
                for role, m in modules.items()}
        record = {"mode": "sparsellm", "objective": [], "ffn_error": [], "kept_previous": 0}
        gram_x = self._gram(data["X"]) if self.iters > 1 else None
        products: dict[str, torch.Tensor] = {}
        for t in range(self.iters):
            for role, name in prunable.items():
                if t == 0:
                    W[role] = self._sparsegpt(index, name, W[role], hessians[role], targets[role])
                    continue
                gram, cross = (products["pp"], products["yp"]) if role == "down" else (gram_x, products[role])
                factor = self._cholesky(gram, index, f"refit {name}")
                dense = torch.cholesky_solve(cross.t(), factor).t()
                hessian = 2.0 * gram / nseq if role == "down" else hessians[role]
                new = self._sparsegpt(index, name, dense, hessian, targets[role])
                if _quadratic(new, gram, cross) <= _quadratic(W[role], gram, cross):
                    W[role] = new
                else:
                    record["kept_previous"] += 1
            last = t == self.iters - 1
            objective, error, products = self._pass(index, W, bias, data, act, update=not last)
            if not (math.isfinite(objective) and all(torch.isfinite(w).all() for w in W.values())):
                raise ValueError(f"sparsellm: block {index} diverged at iteration {t} (objective {objective})")
            record["objective"].append(objective)
            record["ffn_error"].append(error)
        self._blocks[index] = record
        return W

    def _chunks(self, tokens: int):
        return (slice(i, min(i + self.chunk_tokens, tokens)) for i in range(0, tokens, self.chunk_tokens))

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        gram = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        for c in self._chunks(len(x)):
            xc = x[c].float()
            gram += xc.t() @ xc
        return gram

    def _pass(self, index: int, W: dict[str, torch.Tensor], bias: dict, data: dict[str, torch.Tensor],
              act: Activation, update: bool) -> tuple[float, float, dict[str, torch.Tensor]]:
        """One sweep over token chunks: the objective and FFN output error per token at the current weights and
        auxiliary variables, then (if ``update``) the p, z (and s) updates and the products the next refit needs."""
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        gated = "s" in data
        b1 = bias["up"] if bias["up"] is not None else 0.0
        b2 = bias["down"] if bias["down"] is not None else 0.0
        if update:
            w2 = W["down"]
            m = beta * (w2.t() @ w2)
            m.diagonal().add_(gamma)
            m_inv = torch.cholesky_inverse(self._cholesky(m, index, "p-update"))
            products = {"up": 0, "pp": 0, "yp": 0} | ({"gate": 0} if gated else {})
        else:
            products = {}
        objective = error = 0.0
        tokens = len(data["X"])
        for c in self._chunks(tokens):
            x, y, z, p = (data[k][c].float() for k in ("X", "Y", "z", "p"))
            s = data["s"][c].float() if gated else None
            m_up = x @ W["up"].t() + b1
            m_gate = x @ W["gate"].t() if gated else None
            a = act(s) * z if gated else act(z)
            target = y - b2
            terms = alpha * (z - m_up).square().sum() + gamma * (p - a).square().sum()
            terms += beta * (target - p @ W["down"].t()).square().sum()
            if gated:
                terms += alpha * (s - m_gate).square().sum()
            objective += terms.item()
            hidden = act(m_gate) * m_up if gated else act(m_up)
            error += (target - hidden @ W["down"].t()).square().sum().item()
            if not update:
                continue
            p = (beta * target @ W["down"] + gamma * a) @ m_inv
            data["p"][c] = p
            p = data["p"][c].float()
            if gated:
                z = gated_z_update(m_up, act(s), p, alpha, gamma)
                data["z"][c] = z
                z = data["z"][c].float()
                s = gate_update(act, s, m_gate, z, p, alpha, gamma, self.gate_lr, self.gate_steps)
                data["s"][c] = s
                products["gate"] = products["gate"] + data["s"][c].float().t() @ x
            else:
                z = relu_z_update(m_up, p, alpha, gamma) if isinstance(act, nn.ReLU) else \
                    _keep_better(scalar_z_update(act, m_up, p, alpha, gamma), z, act, m_up, p, alpha, gamma)
                data["z"][c] = z
            products["up"] = products["up"] + (data["z"][c].float() - b1).t() @ x
            products["pp"] = products["pp"] + p.t() @ p
            products["yp"] = products["yp"] + target.t() @ p
        return objective / tokens, error / tokens, products


def _keep_better(new: torch.Tensor, old: torch.Tensor, act: Activation, m: torch.Tensor, p: torch.Tensor,
                 alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise, whichever of two z values has the lower α(z − m)² + γ(p − act(z))²."""
    def f(z):
        return alpha * (z - m) ** 2 + gamma * (p - act(z)) ** 2

    return torch.where(f(new) <= f(old), new, old)


def _quadratic(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """‖T − X·Wᵀ‖² up to the constant ‖T‖², from G = XᵀX and C = TᵀX: ⟨W·G, W⟩ − 2⟨W, C⟩ (in fp64)."""
    w, g, c = weight.double(), gram.double(), cross.double()
    return ((w @ g) * w).sum().item() - 2 * (w * c).sum().item()


def act_fn(name: str | None) -> Activation:
    """The element-wise activation a model config names (``relu``, ``gelu_new``, ``silu``...)."""
    from transformers.activations import ACT2FN

    if name is None or name not in ACT2FN:
        raise UserError(f"sparsellm: unknown FFN activation {name!r}")
    return ACT2FN[name]
