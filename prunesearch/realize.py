"""``prunesearch realize``: the chosen allocation pruned for real at full quality (a width allocation sliced),
evaluated on report data only (never the search's), and saved as a ``from_pretrained`` folder."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pruners.methods import METHODS
from pruners.targets import SparsityConfig, read_config
from prunesearch.safety import UserError


@dataclass(frozen=True)
class BothChoice:
    """A ``--space both`` allocation: the ``width`` section to slice to, then the kept weights' sparsity targets."""

    width: dict
    sparsity: SparsityConfig


def load_choice(run: str | None, config: str | None) -> tuple[SparsityConfig | dict | BothChoice, dict, str]:
    """The allocation to realize: a run's ``best_config.json`` or a config file; returns (the sparsity config, a
    width config's ``width`` section, or both, its ``meta`` with the search's fitness and protocol, the file it
    came from)."""
    if run is not None:
        path = Path(run) / "best_config.json"
        if not path.is_file():
            if (Path(run) / "pareto.csv").is_file():
                raise UserError(f"{run} is a budget-range run with a Pareto front, not one best allocation; pass "
                                f"--config {Path(run) / 'pareto'}/<one of its files>")
            raise UserError(f"{run} has no best_config.json (not a finished single-budget search)")
    else:
        path = Path(config)
    data = read_config(path)
    meta = data.get("meta") or {}
    if "width" not in data:
        return SparsityConfig.from_dict(data), meta, str(path)
    if "sparsity" in data:
        if set(data) - {"width", "sparsity", "pattern", "meta"} or not isinstance(data["width"], dict) \
                or not data["width"]:
            raise UserError(f"{path}: a widths-and-sparsity config holds a non-empty width section, sparsity, "
                            "pattern and meta, nothing else")
        sparsity = SparsityConfig.from_dict({k: v for k, v in data.items() if k in ("sparsity", "pattern")})
        return BothChoice(data["width"], sparsity), meta, str(path)
    if set(data) - {"width", "meta"} or not isinstance(data["width"], dict) or not data["width"]:
        raise UserError(f"{path}: a width config holds a non-empty width section (and meta), nothing else")
    return data["width"], meta, str(path)


def method(given: str | None, width: bool) -> str:
    """The realizing method: a width allocation is sliced (``width``); a sparsity one needs one of
    ``pruners.methods``."""
    if width:
        if given not in (None, "width"):
            raise UserError(f"a width allocation is realized by slicing heads and channels: --method width (or "
                            f"none), not --method {given}")
        return "width"
    if given in (None, "width"):
        raise UserError(f"a sparsity allocation needs --method {' | '.join(METHODS)}"
                        + (" (width slices width allocations only)" if given else ""))
    return given


def calibration(args: Namespace, meta: dict, width: bool) -> dict:
    """``calib``, ``nsamples``, ``seed`` and ``seqlen``: as given; else, for a width allocation, the search's own
    (the config's ``meta``), so the heads and channels kept are those of the candidate it measured; else the
    defaults."""
    from prunesearch.commands.options import CALIB_DEFAULTS

    search = {"calib": (meta.get("calib") or {}).get("dataset"), "nsamples": meta.get("nsamples"),
              "seed": meta.get("seed"), "seqlen": meta.get("seqlen")} if width else {}
    out = {key: next((v for v in (getattr(args, key), search.get(key), CALIB_DEFAULTS.get(key)) if v is not None),
                     None) for key in ("calib", "nsamples", "seed", "seqlen")}
    if out["nsamples"] < 1:
        raise UserError("--nsamples must be at least 1")
    return out


def width_target(section: dict, meta: dict) -> tuple[Callable, dict]:
    """What slices a width allocation: its widths, and the search's width score without bias compensation (the
    search masked without it), so the sliced model gives the outputs of the candidate the search measured."""
    from pruners.width.allocation import from_config
    from pruners.width.importance import METRICS

    score = meta.get("width_score", "flap")
    if score not in METRICS:
        raise UserError(f"the config's width_score must be one of {', '.join(METRICS)}, got {score!r}")
    return lambda geom, imp, s: from_config(geom, section), {"score": score, "bias_compensation": False}


def check_eval_data(names: list[str], data_dir: str | None) -> None:
    """Refuse, before any pruning, report datasets that are not available here."""
    from prunesearch import sources

    for name in names:
        if name in sources.NAMES:
            missing = sources.describe(name, data_dir)["evaluation"].get("unavailable")
            if missing:
                raise UserError(missing)


def realize_report(prune_report: dict, meta: dict, origin: str, fmt: str, evaluation: dict) -> dict:
    """``realize_report.json``: the pruning report (method, layers, protocol, timings), where the allocation came
    from with the search's own fitness and protocol, and the report-data evaluation with its protocol."""
    return {**prune_report, "format": fmt, "allocation_from": origin, "search": meta, **evaluation}
