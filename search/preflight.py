"""Checks of a ``prunesearch search`` command that need no model: run before anything is loaded or written, so a
mistake costs no model load and leaves no folder behind."""

from __future__ import annotations

from pathlib import Path

from prunesearch.safety import UserError


def check_search_args(args) -> None:
    """Numbers, budget, pattern (against the model's config), storage URL and run folder of a search command."""
    from pruners.masks import parse_pattern
    from prunesearch.models import check_pattern_fits, load_config, model_source
    from search.budget import Budget
    from search.stages import COARSE_TO_FINE, check_folder, is_staged
    from search.storage import check_storage

    for flag, value, low in (("--trials", args.trials, 1), ("--workers", args.workers, 1),
                             ("--heartbeat", args.heartbeat, 1), ("--fitness-samples", args.fitness_samples, 1),
                             ("--low-fidelity-samples", args.low_fidelity_samples, 1), ("--nsamples", args.nsamples, 1),
                             ("--batch-size", args.batch_size, 1), ("--report-limit", args.report_limit, 0),
                             ("--select-top", args.select_top, 0), ("--select-samples", args.select_samples, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    Budget.parse(args.budget)
    m = parse_pattern(args.pattern)
    check_storage(args.storage)
    if args.model is not None:
        load_config(model_source(args.model))  # a missing folder or a broken config.json is one line
        check_pattern_fits(args.model, m)
    out = Path(args.out)
    if args.granularity == COARSE_TO_FINE:
        check_folder(out)
    elif is_staged(out):
        raise UserError(f"--out {out} holds a --granularity {COARSE_TO_FINE} search; repeat that option to resume "
                        f"it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    elif out.is_dir() and any(out.iterdir()) and not (out / "run_config.json").is_file():
        raise UserError(f"--out {out} exists and is not a prunesearch run folder")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise UserError(f"--cache-dir {args.cache_dir} is not a folder")
    if args.predictor_init and not (Path(args.predictor_init) / "predictor.json").is_file():
        raise UserError(f"--predictor-init {args.predictor_init} is not a predictor folder (no predictor.json)")
