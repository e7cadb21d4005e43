"""The final selection: the search's best few allocations pruned for real and re-measured on fresh held-out windows;
the best there is the run's answer.

Why: the search scores candidates fast (cached ranks, or a SparseGPT level database stitched per unit) on a few
thousand tokens, and after many trials its best is partly the one that fits that proxy's errors best. Measured on
SmolLM2-135M at 70% with the SparseGPT database (README): the six best of 100 trials read 1.839-1.877 KL as
searched, but 1.782-1.943 pruned sequentially on 32 fresh C4 windows. EvoPress likewise ranks its last candidates
on more tokens than its first.
The fresh windows continue the fitness windows' random draw (the same seed and text), so they are never the
report's data; the finalists' scores are kept in ``selection.json`` and reused when the run is finished again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError
from search.realized import PARENTS, best_realized, by_fitness, realized_value
from search.samplers import trial_label
from search.seeds import START

# Finalists and fresh windows when the user gives none (as ``search.settings.EFFORT``): a real model on CPU realizes
# each finalist for real (75-90 s each with SparseGPT on SmolLM2-135M), so it gets fewer of both.
DEFAULTS = {"builtin": (4, 32), "gpu": (8, 64), "cpu": (6, 32)}


@dataclass(frozen=True)
class Selection:
    """``top`` finalists (0: the best search fitness is the answer), each scored on ``samples`` fresh windows."""

    top: int
    samples: int

    def validate(self) -> None:
        if self.top < 0:
            raise UserError(f"--select-top must be 0 (no final selection) or more, got {self.top}")
        if self.top and self.samples < 1:
            raise UserError(f"--select-samples must be at least 1, got {self.samples}")


def default_selection(builtin: bool, device: str) -> Selection:
    """The final selection a search makes unless told otherwise (see ``DEFAULTS``)."""
    top, samples = DEFAULTS["builtin" if builtin else "gpu" if device.startswith("cuda") else "cpu"]
    return Selection(top, samples)


def finalists(complete: list[optuna.trial.FrozenTrial], top: int, also: Sequence[int] = ()
              ) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` best completed trials by search fitness, one per distinct allocation, then every ``--enqueue``
    start not among them: an earlier answer (coarse to fine's block answer) is re-measured beside what the search
    found from it, so a run never ends worse on the fresh windows than where it started; then the trials ``also``
    names (the best realized allocations of ``--realize-top``)."""
    distinct = by_fitness(complete)
    starts = {t.user_attrs.get("duplicate_of", t.number) for t in complete
              if str(t.user_attrs.get("seed", "")).startswith(START)}  # a start equal to an earlier trial: that one
    return distinct[:top] + [t for t in distinct[top:] if t.number in starts or t.number in set(also)]


def select(ws, complete: list[optuna.trial.FrozenTrial], selection: Selection, path: Path) -> dict:
    """Prune each finalist for real (``ws.prune_for_report``), score it on the fresh windows, and return the record:
    protocol, every finalist's search and selection fitness, and the chosen trial. The model is dense afterwards."""
    from prunesearch import data
    from search.fitness import make_fitness

    s = ws.settings
    protocol = {"samples": selection.samples, "seqlen": ws.seqlen, "fitness_kind": s.fitness,
                "data": ws.heldout_protocol, "windows": f"held-out windows {s.fitness_samples}-"
                f"{s.fitness_samples + selection.samples - 1} of seed {s.seed} (the fitness used 0-"
                f"{s.fitness_samples - 1})", "realized_with": ws.realized_with}
    known = read_json(path, "selection record") if path.exists() else {}
    scores = {int(k): v for k, v in known.get("scores", {}).items()} if known.get("protocol") == protocol else {}
    chosen = finalists(complete, selection.top, best_realized(ws.out, PARENTS))
    todo = [t for t in chosen if t.number not in scores]
    if todo:
        ids = data.heldout_ids(ws.tokenizer, s.fitness_samples + selection.samples, ws.seqlen, s.seed, s.data_dir,
                               s.fitness_data)[s.fitness_samples:]
        key = s.key("model", "fitness_samples", "seqlen", "seed", "data_dir", "fitness_data")
        ws.reset()  # the dense reference: the last trial left its candidate in the model
        fitness = make_fitness(s.fitness, ws.model, ids, ws.batch_size,
                               ws.cache / f"selection-reference-{key}-{selection.samples}.safetensors")
        calib = ws.calibration_ids()
        for t in todo:
            start = time.perf_counter()
            value = realized_value(ws, t.user_attrs["allocation"], calib, fitness, selection.samples)
            scores[t.number] = {"fitness": value, "wall_s": time.perf_counter() - start}
            atomic_json(path, {"protocol": protocol, "scores": scores})  # a killed finish keeps what it measured
        ws.reset()
    rows = [{"trial": t.number, "label": trial_label(t, s.sampler), "search_fitness": t.value,
             "selection_fitness": scores[t.number]["fitness"], "wall_s": scores[t.number]["wall_s"]} for t in chosen]
    record = {"protocol": {"top": selection.top, **protocol}, "finalists": rows,
              "chosen": min(rows, key=lambda r: r["selection_fitness"])["trial"]}
    atomic_json(path, {**record, "protocol": protocol, "scores": scores})
    return record
