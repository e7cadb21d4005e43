"""Realized fitness of the guided search's most promising allocations: each allocation that enters the ``top`` best by
search fitness is pruned for real (sequentially, as the final model will be) and scored on the same fitness windows;
the guided loop then takes its local moves and its incumbent from the best *realized* allocations.

Why: the search scores candidates with a fast proxy (cached dense-input ranks). Measured on SmolLM2-135M at 70% with
Wanda (README): proxy and sequential pruning disagree by up to ±0.15 nats per allocation, as much as the guided
search gains after its seeds, so late in a search the local moves grew from allocations that fit the proxy's errors
(the proxy's best read 2.032 → 2.187 realized, the final selection's choice 2.063 → 2.044). The proxy still decides
which allocations are promising; realization, ~4× its cost, decides which of them the search builds on.
Scores are kept in ``realized.json`` (keyed by protocol) and reused when a run resumes; the final selection adds the
best realized allocations to its finalists.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import optuna

from prunesearch.files import atomic_json, read_json

log = logging.getLogger("prunesearch.search")
REALIZED_FILE = "realized.json"
PARENTS = 3  # the best realized allocations the local moves start from (as the proxy's best three without it)


def protocol(ws) -> dict:
    """What a realized score depends on: the fitness windows, the calibration and the pruner run sequentially."""
    s = ws.settings
    return {"fitness_kind": s.fitness, "fitness_samples": s.fitness_samples, "seqlen": ws.seqlen, "seed": s.seed,
            "data": ws.heldout_protocol, "calibration": ws.calib_protocol, "nsamples": s.nsamples,
            "realized_with": ws.realized_with}


def read_scores(out: Path, expected: dict | None = None) -> dict[int, dict]:
    """Realized scores of a run by trial number ({} when none, or when ``expected`` protocol differs)."""
    path = Path(out) / REALIZED_FILE
    if not path.exists():
        return {}
    known = read_json(path, "realized scores")
    if expected is not None and known.get("protocol") != expected:
        return {}
    return {int(k): v for k, v in known.get("scores", {}).items()}


def by_fitness(complete: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Completed trials best first by search fitness, one per distinct allocation (duplicates left out)."""
    return sorted((t for t in complete if "duplicate_of" not in t.user_attrs), key=lambda t: t.value)


def realized_value(ws, alloc: np.ndarray, calib, fitness, samples: int) -> float:
    """Prune the dense model to ``alloc`` for real (``ws.prune_for_report``) and score it on the first ``samples``
    sequences of ``fitness``; the model is left pruned (callers ``ws.reset()``)."""
    ws.reset()
    ws.prune_for_report(np.asarray(alloc), calib)
    return fitness.value(*fitness.partial(ws.model, 0, samples))


def best_realized(out: Path, n: int) -> list[int]:
    """The ``n`` trial numbers with the best realized fitness in a run folder (for the final selection)."""
    scores = read_scores(out)
    return sorted(scores, key=lambda k: scores[k]["fitness"])[:n]


class RealizedFitness:
    """Keeps the realized scores of a run and realizes the trials that enter the top ``top`` by search fitness."""

    def __init__(self, ws, top: int):
        self.ws, self.top = ws, top
        self.path = ws.out / REALIZED_FILE
        self.protocol = protocol(ws)
        self.scores = read_scores(ws.out, self.protocol)
        self._calib = None

    def update(self, complete: list[optuna.trial.FrozenTrial]) -> list[int]:
        """Realize every trial among the ``top`` distinct best by search fitness not realized yet; returns them."""
        todo = [t for t in by_fitness(complete)[:self.top] if t.number not in self.scores]
        if not todo:
            return []
        ws = self.ws
        if self._calib is None:
            self._calib = ws.calibration_ids()
        for t in todo:
            start = time.perf_counter()
            value = realized_value(ws, t.user_attrs["allocation"], self._calib, ws.fitness, ws.heldout.shape[0])
            self.scores[t.number] = {"fitness": value, "search_fitness": t.value,
                                     "wall_s": time.perf_counter() - start}
            atomic_json(self.path, {"protocol": self.protocol, "scores": self.scores})  # a kill keeps what it measured
            log.info("realized trial %d: search fitness %.4f, pruned for real %.4f (%.0f s)", t.number, t.value, value,
                     self.scores[t.number]["wall_s"])
        ws.reset()
        return [t.number for t in todo]

    def parents(self, done: list[optuna.trial.FrozenTrial], y: np.ndarray) -> np.ndarray:
        """Indices into ``done`` of the best realized allocations (best first), topped up by search fitness."""
        index = {t.number: i for i, t in enumerate(done)}
        realized = sorted((k for k in self.scores if k in index), key=lambda k: self.scores[k]["fitness"])
        order = [index[k] for k in realized] + [i for i in np.argsort(y) if done[i].number not in self.scores]
        return np.array(order[:PARENTS])
