"""The AST training loop: a sparse student distilled from its frozen dense self, with masks that keep adapting.

Per optimizer step: (micro-batches of) distillation loss → backward (straight-through to the dense weights) →
gradient clipping → SR-STE decay λ(t)(1−M)⊙W → AdamW at the cosine/warm-up learning rate; every ``mask_every``
steps every mask is re-selected from the current dense weights and the flip rate is logged. Checkpoints hold
tensors in safetensors (student, optimizer moments, RNG) and scalars in JSON, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from pruners.distill import distill_loss
from pruners.masks import Target
from pruners.registry import layout
from pruners.slorb import SLoRB
from pruners.sparse_linear import METRICS, SparseLinear, sparsify, srste_lambda
from pruners.walker import collect_stats
from prunesearch.files import read_json
from prunesearch.safety import UserError, first_line

CHECKPOINT_FORMAT = "prunesearch-ast-checkpoint-v1"


@dataclass
class ASTSettings:
    """Everything that defines an AST run (saved with each checkpoint; a resume must use the same values)."""

    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr: float | None = None  # default lr / 10
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    a_task: float = 0.33
    a_kl: float = 0.67
    a_hidden: float = 0.0
    temperature: float = 2.0
    mask_every: int = 10  # 0: the initial mask stays fixed
    mask_metric: str = "magnitude"
    srste_lambda: float = 1e-4
    srste_ramp: float = 0.25
    slorb_k: int = 0  # 0: no SLoRB
    slorb_trainable_projection: bool = False
    gradient_checkpointing: bool = False
    wanda_samples: int = 128

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and gradient accumulation must be >= 1"),
            (self.lr > 0 and (self.min_lr is None or 0 <= self.min_lr <= self.lr), "need lr > 0, 0 <= min-lr <= lr"),
            (0 <= self.warmup < 1 and 0 <= self.srste_ramp <= 1, "warm-up and SR-STE ramp are fractions in [0, 1)"),
            (self.a_task >= 0 and self.a_kl >= 0 and self.a_hidden >= 0 and self.a_task + self.a_kl + self.a_hidden > 0,
             "loss weights must be >= 0 and not all 0"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.mask_every >= 0, "mask-every must be >= 0 (0 keeps the mask fixed)"),
            (self.mask_metric in METRICS, f"mask metric must be one of {', '.join(METRICS)}"),
            (self.srste_lambda >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
             "SR-STE lambda, weight decay and grad clip must be >= 0"),
            (self.slorb_k >= 0, "slorb-k must be >= 0 (0: no SLoRB)"),
            (self.wanda_samples >= 1, "wanda-samples must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def windows(self) -> int:
        """Training sequences the whole run consumes (each used once, in order)."""
        return self.steps * self.grad_accum * self.batch_size


def lr_at(step: int, s: ASTSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine down to ``min_lr``."""
    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
    warm = round(s.warmup * s.steps)
    if step < warm:
        return s.lr * (step + 1) / warm
    progress = (step - warm) / max(1, s.steps - warm - 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (s.lr - min_lr)


@torch.no_grad()
def wanda_norms(model: nn.Module, ids: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Static Wanda norms s_j of every projection, from the dense model on ``ids`` (as the reference does once)."""
    lay = layout(model)
    modules = {n: m for block in lay.projections for n, m in block.items()}
    device = next(model.parameters()).device
    with collect_stats(modules, full=False) as stats:
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    return {n: s.norm_sq for n, s in stats.items()}


class ASTTrainer:
    """Holds the student (wrapped in place), the frozen teacher, the optimizer and the run's history."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], settings: ASTSettings, train_ids: torch.Tensor,
                 device: str = "cpu"):
        if train_ids.shape[0] < settings.windows:
            raise ValueError(f"the run needs {settings.windows} training windows, got {train_ids.shape[0]}")
        self.settings, self.train_ids, self.device = settings, train_ids, device
        self.student = model.to(device)
        self.teacher = None
        if settings.a_kl or settings.a_hidden:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        norms = None
        if settings.mask_metric == "wanda":
            model.eval()
            norms = wanda_norms(model, train_ids[:settings.wanda_samples], settings.batch_size)
        self.layers: dict[str, SparseLinear] = sparsify(model, targets, settings.mask_metric, norms)
        if settings.slorb_k:
            for layer in self.layers.values():
                layer.slorb = SLoRB.from_pruned(layer.dense_weight(), layer.mask, settings.slorb_k,
                                                settings.slorb_trainable_projection)
        if settings.gradient_checkpointing:  # renamed in transformers 5
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        model.config.use_cache = False
        self.optimizer = self._optimizer()
        self.step = 0
        self.history: list[dict] = []

    def _optimizer(self) -> torch.optim.AdamW:
        """AdamW (0.9, 0.95); weight decay on matrices only (not on biases and norms), as nanoGPT/AST."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.settings.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.settings.lr, betas=(0.9, 0.95))

    def _target_names(self) -> dict[str, str]:
        return {name: str(layer.target) for name, layer in self.layers.items()}

    def slorb_parameters(self) -> int:
        """Parameters SLoRB adds over all layers (0 without SLoRB)."""
        return sum(layer.slorb.num_parameters() for layer in self.layers.values() if layer.slorb is not None)

    def _autocast(self):
        if str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _micro_loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        hidden = bool(s.a_hidden)
        with self._autocast():
            out = self.student(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            teacher = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher = self.teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        return distill_loss(out.logits, teacher.logits if teacher is not None else None, ids, s.a_task, s.a_kl,
                            s.temperature, out.hidden_states if hidden else None,
                            teacher.hidden_states if hidden else None, s.a_hidden)

    def train_step(self) -> dict:
        """One optimizer step (over ``grad_accum`` micro-batches); returns its log record."""
        s = self.settings
        self.student.train()
        totals: dict[str, float] = {}
        for micro in range(s.grad_accum):
            start = (self.step * s.grad_accum + micro) * s.batch_size
            ids = self.train_ids[start:start + s.batch_size].to(self.device)
            loss, parts = self._micro_loss(ids)
            (loss / s.grad_accum).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / s.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if s.grad_clip:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
        lam = srste_lambda(self.step, s.steps, s.srste_lambda, s.srste_ramp)
        for layer in self.layers.values():
            layer.add_srste_decay(lam)
        lr = lr_at(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, **totals, "lr": lr, "srste_lambda": lam}
        if s.mask_every and self.step % s.mask_every == 0:
            record.update(self.refresh_masks())
        self.history.append(record)
        return record

    @torch.no_grad()
    def refresh_masks(self) -> dict:
        """Re-select every mask from the current dense weights; flips over all masked weights."""
        flips = sum(layer.refresh() for layer in self.layers.values())
        total = sum(layer.mask.numel() for layer in self.layers.values())
        return {"mask_refresh": True, "flips": flips, "flip_rate": flips / total}

    def train(self, checkpoint_dir: str | Path | None = None, save_every: int = 0, progress: bool = True) -> list:
        """Run to ``settings.steps``; checkpoint every ``save_every`` steps and at the end when a folder is given."""
        bar = tqdm(total=self.settings.steps, initial=self.step, disable=not progress, desc="ast", unit="step")
        last_flip = None
        while self.step < self.settings.steps:
            record = self.train_step()
            last_flip = record.get("flip_rate", last_flip)
            post = {"loss": f"{record['loss']:.4f}"}
            if "kl" in record:
                post["kl"] = f"{record['kl']:.4f}"
            if last_flip is not None:
                post["flip"] = f"{last_flip:.2e}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if checkpoint_dir and (save_every and self.step % save_every == 0 or self.step == self.settings.steps):
                self.save_checkpoint(checkpoint_dir)
        bar.close()
        return self.history

    def save_checkpoint(self, folder: str | Path) -> None:
        """Student + optimizer moments + RNG in safetensors, scalars in JSON; written atomically (rename)."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_model(self.student, str(tmp / "student.safetensors"))
        tensors, scalars = {}, {}
        for i, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{i}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and str(self.device).startswith("cuda"):
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        groups = [{k: v for k, v in g.items()} for g in self.optimizer.state_dict()["param_groups"]]
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "settings": asdict(self.settings),
                 "targets": self._target_names(),
                 "param_groups": groups, "optimizer_scalars": scalars, "history": self.history}
        (tmp / "state.json").write_text(json.dumps(state))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` for the same settings and model."""
        folder = Path(folder)
        path = folder / "state.json"
        if not path.is_file():
            raise UserError(f"no AST checkpoint in {folder}")
        state = read_json(path, "AST checkpoint state")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        saved = state["settings"]
        diff = {k: (saved.get(k), v) for k, v in asdict(self.settings).items() if saved.get(k) != v}
        if diff:
            raise UserError("the checkpoint was made with other settings (saved, now): "
                            + ", ".join(f"{k}={a}→{b}" for k, (a, b) in diff.items()))
        if state["targets"] != self._target_names():
            raise UserError("the checkpoint was made for other per-layer targets (pattern or config)")
        try:
            missing, unexpected = load_model(self.student, str(folder / "student.safetensors"), strict=False,
                                             device=str(self.device))
            tensors = load_file(str(folder / "optimizer.safetensors"))
        except (OSError, SafetensorError) as e:
            raise UserError(f"the AST checkpoint in {folder} is damaged ({first_line(e)}); resume from a backup "
                            f"or start again without --resume") from e
        if missing or unexpected:
            raise UserError(f"the checkpoint does not fit this model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})")
        torch.set_rng_state(tensors.pop("rng.cpu"))
        cuda_rng = tensors.pop("rng.cuda", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        opt_state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *state["optimizer_scalars"].items()]:
            i, name = key.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = value
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.step = state["step"]
        self.history = state["history"]
