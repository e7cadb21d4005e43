"""Wanda (Sun et al., 2023): score |W_ij|·√s_j with s_j the input norm², pruned per output row; no weight update."""

from __future__ import annotations

import torch

from pruners.masks import Target, select
from pruners.walker import InputStats


class Wanda:
    name = "wanda"
    stats = "norms"

    def score(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return weight.abs().float() * stats.norm_sq.to(weight.device, torch.float32).sqrt().unsqueeze(0)

    def prune(self, weight: torch.Tensor, stats: InputStats, target: Target) -> torch.Tensor:
        mask = select(self.score(weight, stats), target, per_row=True)
        return weight.masked_fill(mask, 0)
