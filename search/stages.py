"""Coarse to fine (``--granularity block,projection``): a block-level search, then a projection-level search that
starts from its answer (``--enqueue``), each a complete run folder under one ``--out``.

Why two stages: measured on SmolLM2-135M (README), a projection-level search started from the block-level answer
beat every heuristic where the block search alone tied (Wanda 60%: 0.994× → 0.897× the best ATP slope) or lost
(SparseGPT 70%: 1.05× → 0.987×), while a projection search from scratch spends its trials on 210 units at once.
The second stage's defaults are the measured ones: the evolution (its kind shifts move one projection kind
against another), no predictor, unless the user names a sampler or ``--predictor on``.

The folder: ``OUT/stages.json`` (which stages, which is final), ``OUT/block/``, ``OUT/projection/`` and the
caches both share in ``OUT/cache`` (unless ``--cache-dir``). ``final_run`` resolves ``OUT`` to its last stage, so
``export``, ``report`` and ``realize --run OUT`` read the answer; ``stage_runs`` gives ``predictor retrain`` both
stages' trials. The same command again resumes both stages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError, mark_output

from search.settings import SearchSettings

COARSE_TO_FINE = "block,projection"
STAGES = ("block", "projection")
RECORD = "stages.json"


def is_staged(folder: Path) -> bool:
    """Whether ``folder`` is a coarse-to-fine search folder (it holds :data:`RECORD`)."""
    return (Path(folder) / RECORD).is_file()


def final_run(folder: str | Path) -> Path:
    """A run folder as given; a coarse-to-fine folder's last stage (the one holding the answer)."""
    folder = Path(folder)
    if not is_staged(folder):
        return folder
    record = read_json(folder / RECORD, "coarse-to-fine record")
    if not isinstance(record, dict) or record.get("final") not in STAGES:
        raise UserError(f"{folder / RECORD} is not a coarse-to-fine record (no final stage)")
    return folder / record["final"]


def stage_runs(folder: str | Path) -> list[Path]:
    """A run folder as given; a coarse-to-fine folder's stages that hold trials, coarse first.

    Both stages measure the same fitness on the same tokens and predictor features resample every profile to
    depth bins, so their trials are pairs of one kind: a predictor learns from both."""
    folder = Path(folder)
    if not is_staged(folder):
        return [folder]
    final_run(folder)  # the record must be readable
    runs = [folder / stage for stage in STAGES if (folder / stage / "trials.parquet").is_file()]
    if not runs:
        raise UserError(f"{folder} is a coarse-to-fine folder with no finished stage yet: run its search first")
    return runs


def check_folder(out: Path) -> None:
    """Refuse an ``--out`` for a coarse-to-fine search that holds something else (a one-stage run, other files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_staged(out):
        kind = "a one-granularity search run" if (out / "run_config.json").is_file() else "not a prunesearch folder"
        raise UserError(f"--out {out} exists and is {kind}; a --granularity {COARSE_TO_FINE} search needs a new "
                        f"folder or one it wrote")


def check_settings(settings: SearchSettings) -> None:
    """What the two stages cannot do: a budget range (the first stage's answer is one allocation), width spaces."""
    if settings.space != "sparsity":
        raise UserError(f"--granularity {COARSE_TO_FINE} refines a sparsity allocation; --space {settings.space} "
                        f"searches widths per block")
    if settings.multi_objective:
        raise UserError(f"--granularity {COARSE_TO_FINE} refines one answer; a budget range keeps a Pareto front "
                        f"(give one budget)")


def stage_settings(settings: SearchSettings, out: Path, sampler: str | None) -> list[tuple[str, SearchSettings]]:
    """The settings of both stages: the first at block granularity as given, the second at projection granularity,
    started from the first's ``best_config.json``, with ``sampler`` (default: the evolution)."""
    coarse = dataclasses.replace(settings, granularity="block")
    fine = dataclasses.replace(settings, granularity="projection", sampler=sampler or "evo",
                               enqueue=[str(out / "block" / "best_config.json")])
    return [("block", coarse), ("projection", fine)]


def run_stages(settings: SearchSettings, out: Path, run: Callable[..., dict], sampler: str | None,
               guides: tuple[Callable | None, Callable | None], time_budget: float | None, cache_dir: Path | None,
               study_name: str, report_ppl: tuple[str, ...], report_limit: int | None,
               on_stage: Callable[[str, dict, Path], None] | None = None) -> dict:
    """Run (or resume) both stages with ``run`` (``search.study.run_search`` with the arguments both stages share
    bound); the first gets half of a ``time_budget``, the second what is left. Report data (``report_ppl``) is
    measured on the final stage only. Returns ``{"stages": {name: summary}, "final": name}``; stops after a stage
    that was interrupted, stopped by failures, or completed no trial."""
    check_settings(settings)
    check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "search")
    atomic_json(out / RECORD, {"stages": list(STAGES), "final": STAGES[-1], "granularity": COARSE_TO_FINE})
    cache_dir = cache_dir or out / "cache"
    deadline = time.time() + time_budget if time_budget else None
    summaries: dict[str, dict] = {}
    plan = stage_settings(settings, out, sampler)
    for i, ((name, s), guide) in enumerate(zip(plan, guides)):
        last = i == len(plan) - 1
        left = None
        if deadline is not None:
            left = max(1.0, (deadline - time.time()) / (1 if last else 2))
        summary = run(s, out / name, time_budget=left, guide=guide, cache_dir=cache_dir,
                      study_name=f"{study_name}-{name}", report_ppl=report_ppl if last else (),
                      report_limit=report_limit)
        summaries[name] = summary
        if on_stage is not None:
            on_stage(name, summary, out / name)
        if summary.get("stopped") or summary.get("interrupted") or summary.get("best") is None:
            break
    return {"stages": summaries, "final": STAGES[-1]}
