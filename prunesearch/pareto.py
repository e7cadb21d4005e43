"""The Pareto front of points to minimize in every coordinate (a benchmark's PPL against measured latency)."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every coordinate and better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[bool]:
    """Per point, whether no other point dominates it (equal points do not dominate each other, so both stay)."""
    return [not any(dominates(q, p) for q in points) for p in points]
