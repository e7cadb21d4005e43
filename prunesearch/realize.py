"""``prunesearch realize``: the chosen allocation pruned for real at full quality, evaluated on report data only
(never the search's), and saved as a ``from_pretrained`` folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from pruners.targets import SparsityConfig
from prunesearch.safety import UserError


def load_choice(run: str | None, config: str | None) -> tuple[SparsityConfig, dict, str]:
    """The allocation to realize: a run's ``best_config.json`` or a config file; returns (config, its ``meta``
    with the search's fitness and protocol, the file it came from)."""
    if run is not None:
        path = Path(run) / "best_config.json"
        if not path.is_file():
            if (Path(run) / "pareto.csv").is_file():
                raise UserError(f"{run} is a budget-range run with a Pareto front, not one best allocation; pass "
                                f"--config {Path(run) / 'pareto'}/<one of its files>")
            raise UserError(f"{run} has no best_config.json (not a finished single-budget search)")
    else:
        path = Path(config)
    parsed = SparsityConfig.load(path)
    meta = (yaml.safe_load(path.read_text()) or {}).get("meta", {})
    return parsed, meta, str(path)


def check_eval_data(names: list[str], data_dir: str | None) -> None:
    """Refuse, before any pruning, report datasets that are not available here."""
    from prunesearch import data

    for name in names:
        if name in data.NAMES:
            missing = data.describe(name, data_dir)["evaluation"].get("unavailable")
            if missing:
                raise UserError(missing)


def realize_report(prune_report: dict, meta: dict, origin: str, fmt: str, evaluation: dict) -> dict:
    """``realize_report.json``: the pruning report (method, layers, protocol, timings), where the allocation came
    from with the search's own fitness and protocol, and the report-data evaluation with its protocol."""
    return {**prune_report, "format": fmt, "allocation_from": origin, "search": meta, **evaluation}
