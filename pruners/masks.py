"""Targets and mask selection shared by the score-based pruners.

A mask is a bool tensor shaped like the weight (out x in) with True where a weight is *pruned*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunesearch.safety import UserError


@dataclass(frozen=True)
class Target:
    """What one layer is pruned to: a sparsity, unstructured (``m == 0``) or as n:m with n = sparsity·m."""

    sparsity: float
    m: int = 0

    def __post_init__(self):
        problem = sparsity_problem(self.sparsity, self.m)
        if problem:  # a user's values are refused (a UserError) where they are read, in SparsityConfig
            raise ValueError(problem)

    @property
    def n(self) -> int:
        """Weights pruned in every group of ``m`` (0 when unstructured)."""
        return round(self.sparsity * self.m) if self.m else 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.sparsity:g}"


def sparsity_problem(sparsity: float, m: int = 0) -> str | None:
    """Why ``sparsity`` cannot be a target under a ``:m`` pattern (0: unstructured), or None if it can."""
    if not 0.0 <= sparsity < 1.0:
        return f"sparsity must be in [0, 1), got {sparsity}"
    if m and abs(sparsity * m - round(sparsity * m)) > 1e-6:
        return f"sparsity {sparsity} is not a multiple of 1/{m} as the :{m} pattern needs"
    return None


def parse_pattern(text: str) -> int:
    """``unstructured`` → 0; ``N:M`` → M (after checking 0 < N < M). The N is the sparsity N/M."""
    if text == "unstructured":
        return 0
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"pattern must be 'unstructured' or 'N:M' such as 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise UserError(f"N:M pattern needs 0 < N < M, got {text!r}")
    return m


def pruned_count(n: int, sparsity: float) -> int:
    """⌊n·p⌋ weights of ``n`` are pruned at sparsity p, with p's float noise forgiven: an allocation projected
    onto a budget reads 0.49999999999999994 for 0.5, and must still prune half."""
    return math.floor(n * sparsity + 1e-9)


def check_pattern_fits_layout(lay, m: int) -> None:
    """Every prunable projection's row length must be a multiple of ``m`` for an N:M pattern."""
    from pruners.registry import get_weight

    for name in lay.projection_names():
        cols = get_weight(lay.projections[lay.block_of(name)][name]).shape[1]
        if cols % m:
            raise UserError(f"pattern N:{m} does not fit: {name} has {cols} input columns, not a multiple of {m}")


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ⌊c·p⌋ lowest-scoring weights of every output row (stable sort, as Wanda)."""
    k = pruned_count(score.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ⌊numel·p⌋ lowest-scoring weights of the whole matrix (magnitude's reference baseline)."""
    k = pruned_count(score.numel(), sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True)[1][:k]] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive input columns of every row, prune the ``n`` lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"a layer with {cols} input columns cannot take an N:{m} pattern")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select(score: torch.Tensor, target: Target, per_row: bool = True) -> torch.Tensor:
    """The mask a score-based pruner keeps for ``target``: N:M per row, else per row or per layer."""
    if target.sparsity == 0.0:
        return torch.zeros_like(score, dtype=torch.bool)
    if target.m:
        return nm_mask(score, target.n, target.m)
    return row_mask(score, target.sparsity) if per_row else layer_mask(score, target.sparsity)


def expected_pruned(shape: tuple[int, int], target: Target, per_row: bool = True) -> int:
    """How many weights ``select`` prunes for a matrix of ``shape`` (for reports and tests)."""
    rows, cols = shape
    if target.m:
        return rows * cols // target.m * target.n
    if per_row:
        return rows * pruned_count(cols, target.sparsity)
    return pruned_count(rows * cols, target.sparsity)
