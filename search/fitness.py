"""The search's fitness: how far a candidate is from the dense model on held-out tokens, summed over a slice of the
held-out sequences at a time, so that a first rung of a few sequences can stop poor candidates early. Each
fitness also gives its per-sequence terms (``rows``): two candidates scored on the same sequences differ by more than
noise only when the paired per-sequence differences say so (``search.drops`` asks before committing to a drop).

``kl`` (default): mean per-token KL(dense ‖ candidate), against dense log-probabilities computed once and cached.
``ppl``: perplexity of the candidate on the same tokens (no dense reference needed).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

KINDS = ("kl", "ppl")


class _Fitness(ABC):
    """What both kinds share: the sum over a slice of sequences from their per-sequence terms."""

    @abstractmethod
    def rows(self, model: nn.Module, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Per-sequence summed terms over held-out sequences ``start:stop``, and the tokens per sequence."""

    def partial(self, model: nn.Module, start: int, stop: int) -> tuple[float, int]:
        """(summed terms, tokens) over held-out sequences ``start:stop``."""
        sums, tokens = self.rows(model, start, stop)
        return float(sums.sum()), sums.numel() * tokens


class KLFitness(_Fitness):
    """Mean KL to the dense model's next-token distributions (``prunesearch.evaluate.DenseReference``)."""

    def __init__(self, model: nn.Module, heldout: torch.Tensor, batch_size: int, cache: Path):
        from prunesearch.evaluate import DenseReference

        self.batch_size = batch_size
        self.reference = DenseReference.cached(cache, model, heldout, batch_size)

    def rows(self, model: nn.Module, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Per-sequence summed KL over held-out sequences ``start:stop``, and the tokens per sequence."""
        return self.reference.kl_rows(model, start, stop, self.batch_size)

    def value(self, total: float, count: int) -> float:
        return total / count


class PerplexityFitness(_Fitness):
    """Perplexity of the candidate itself on the held-out tokens."""

    def __init__(self, model: nn.Module, heldout: torch.Tensor, batch_size: int, cache: Path):
        self.heldout, self.batch_size = heldout, batch_size

    def rows(self, model: nn.Module, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Per-sequence summed negative log-likelihood over held-out sequences ``start:stop``, and the tokens per
        sequence."""
        from prunesearch.evaluate import window_nll

        tokens = self.heldout.shape[1] - 1
        return window_nll(model, self.heldout[start:stop], self.batch_size).double() * tokens, tokens

    def value(self, total: float, count: int) -> float:
        return math.exp(total / count)


def make_fitness(kind: str, model: nn.Module, heldout: torch.Tensor, batch_size: int, cache: Path):
    """The fitness of ``kind`` on ``heldout`` (``cache``: where a dense reference is kept between runs)."""
    return {"kl": KLFitness, "ppl": PerplexityFitness}[kind](model, heldout, batch_size, cache)
