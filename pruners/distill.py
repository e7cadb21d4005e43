"""Distillation losses of AST: task cross-entropy, temperature-scaled KL to the frozen dense teacher, and the
optional hidden-state ("SquareHead") term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (position t predicts token t+1)."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(teacher_T ‖ student_T), summed over the vocabulary and averaged over token positions."""
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / log_s.shape[0]
    return kl * temperature**2


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """SquareHead: Σ over layers of MSE(student, teacher) / mean(teacher²)."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        t = t.float()
        total = total + (s.float() - t).pow(2).mean() / (t.pow(2).mean() + torch.finfo(torch.bfloat16).eps)
    return total


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor,
                 a_task: float, a_kl: float, temperature: float,
                 student_hidden: Sequence[torch.Tensor] | None = None,
                 teacher_hidden: Sequence[torch.Tensor] | None = None,
                 a_hidden: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """a_task·CE + a_kl·T²·KL + a_hidden·SquareHead; returns the loss and its parts as floats for logging."""
    ce = causal_lm_loss(student_logits, ids)
    loss = a_task * ce
    parts = {"ce": ce.item()}
    if a_kl:
        kl = kd_kl(student_logits, teacher_logits, temperature)
        loss = loss + a_kl * kl
        parts["kl"] = kl.item()
    if a_hidden:
        hid = hidden_loss(student_hidden, teacher_hidden)
        loss = loss + a_hidden * hid
        parts["hidden"] = hid.item()
    parts["loss"] = loss.item()
    return loss, parts
