"""Magnitude pruning: score |W|; unstructured over the whole matrix, N:M per row (the references' baseline)."""

from __future__ import annotations

import torch

from pruners.masks import Target, select
from pruners.walker import InputStats


class Magnitude:
    name = "magnitude"
    stats = None  # needs no calibration data

    def score(self, weight: torch.Tensor, stats: InputStats | None = None) -> torch.Tensor:
        return weight.abs().float()

    def prune(self, weight: torch.Tensor, stats: InputStats | None, target: Target) -> torch.Tensor:
        mask = select(self.score(weight), target, per_row=False)
        return weight.masked_fill(mask, 0)
