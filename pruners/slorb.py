"""SLoRB (Sparse Low-Rank Boosting, AST): a cheap branch that gives back what the mask removed.

Input columns are cut into groups of k; P sums each group (a fixed 0/1 matrix, optionally trainable) and
S (rows x cols/k) maps the group sums to the output: y += S·(P x). S starts as the mean over each row-group of
the *pruned* weights (kept ones count as zero), which reproduces the pruned part of W x exactly when the inputs
are constant within each group. It adds rows·cols/k parameters (6.25% of the layer at k = 16). When k does not
divide the columns (e.g. LLaMA's 344-wide down_proj at k = 16) the last group is shorter and S is its mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunesearch.safety import UserError


class SLoRB(nn.Module):
    """y = S·(P x) with S (rows x groups) and P (groups x cols) summing each group of k input columns."""

    def __init__(self, rows: int, cols: int, k: int, trainable_projection: bool = False):
        super().__init__()
        if not 1 <= k <= cols:
            raise UserError(f"SLoRB needs 1 <= k <= the layer's {cols} input columns, got k={k}")
        self.k, self.cols = k, cols
        self.groups = -(-cols // k)
        self.weight = nn.Parameter(torch.zeros(rows, self.groups))
        if trainable_projection:
            proj = torch.zeros(self.groups, cols)
            proj[torch.arange(cols) // k, torch.arange(cols)] = 1.0
            self.projection = nn.Parameter(proj)
        else:
            self.projection = None

    @classmethod
    def from_pruned(cls, weight: torch.Tensor, pruned: torch.Tensor, k: int,
                    trainable_projection: bool = False) -> SLoRB:
        """Mean-initialized from the pruned entries of ``weight`` (``nn.Linear`` layout; ``pruned`` True = pruned)."""
        rows, cols = weight.shape
        module = cls(rows, cols, k, trainable_projection).to(weight.device)
        removed = weight.detach().float() * pruned
        sizes = torch.bincount(torch.arange(cols, device=weight.device) // k).to(removed.dtype)
        module.weight.data.copy_(module._sum_groups(removed) / sizes)
        return module

    def _sum_groups(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.groups * self.k - self.cols
        if pad:
            x = F.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], self.groups, self.k).sum(-1)

    def group_sums(self, x: torch.Tensor) -> torch.Tensor:
        """P x: the sum of every group of k input columns (through P when it is trainable)."""
        if self.projection is not None:
            return F.linear(x, self.projection.to(x.dtype))
        return self._sum_groups(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.group_sums(x), self.weight.to(x.dtype))

    def num_parameters(self) -> int:
        """Extra parameters this branch adds to its layer (S, plus P when trainable)."""
        return sum(p.numel() for p in self.parameters())


def attach(module: nn.Module, slorb: SLoRB) -> None:
    """Add ``slorb``'s output to a plain ``nn.Linear``/``Conv1D`` (a forward hook; the module keeps its type)."""
    module.slorb = slorb
    module.register_forward_hook(lambda m, inputs, out: out + m.slorb(inputs[0]))
