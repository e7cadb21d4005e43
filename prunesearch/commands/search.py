"""The ``search`` command: settings from the command line, the run (``search.study.run_search``) and its summary
table (best allocation or Pareto front against the heuristic seeds)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from prunesearch.commands.common import UsageError


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h`` or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UsageError(f"--time-budget must look like 90s, 30m or 2h, got {text!r}") from None
    if value <= 0:
        raise UsageError("--time-budget must be positive")
    return value


def cmd_search(args) -> int:
    from prunesearch.models import resolve_device
    from search.budget import Budget
    from search.preflight import check_search_args
    from search.selection import Selection, default_selection
    from search.settings import SearchSettings, default_effort, default_report_limit, default_stats_inputs
    from search.stages import COARSE_TO_FINE, STAGES
    from search.study import run_search

    check_search_args(args)  # storage, budget, pattern, out, numbers: before the model loads
    multi = Budget.parse(args.budget).ranged is not None
    width = args.space in ("width", "both")
    if args.width_score and not width:
        raise UsageError("--width-score only works with --space width or both")
    if args.latency_table and not (width and "latency" in Budget.parse(args.budget).kinds):
        raise UsageError("--latency-table only works with --space width or both and a latency= budget")
    if args.space == "both" and args.predictor == "on":
        raise UsageError("the accuracy predictor has features for sparsity and for width allocations, not both at "
                         "once; --space both needs --predictor off")
    if args.realize_top < 0:
        raise UsageError(f"--realize-top must be 0 (off) or more, got {args.realize_top}")
    if args.realize_top and args.stats_inputs == "candidate":
        raise UsageError("--realize-top re-scores the cached ranks' best candidates pruned for real; with "
                         "--stats-inputs candidate every candidate is pruned for real already")
    if multi and args.select_top:
        raise UsageError("--select-top picks one allocation; a budget range keeps its whole Pareto front (give "
                         "one budget, or leave --select-top out)")
    device = resolve_device(args.device)
    given = {"seqlen": args.seqlen, "nsamples": args.nsamples, "fitness_samples": args.fitness_samples,
             "low_fidelity_samples": args.low_fidelity_samples}
    effort = default_effort(args.model is None, device) | {k: v for k, v in given.items() if v is not None}
    # --realize-top re-scores the cached ranks' candidates: it keeps their proxy on every model
    stats_inputs = args.stats_inputs or (None if args.realize_top else
                                         default_stats_inputs(args.model is None, args.pruner, args.space))
    staged = args.granularity == COARSE_TO_FINE
    settings = SearchSettings(
        model=args.model, budget=args.budget, pattern=args.pattern,
        granularity=STAGES[0] if staged else args.granularity,
        pruner=args.pruner, fitness=args.fitness, sampler=args.sampler or ("nsga2" if multi else "tpe"),
        min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity, calib=args.calib, seed=args.seed,
        data_dir=args.data_dir, level_step=args.level_step, space=args.space,
        width_score=args.width_score or "flap", latency_table=args.latency_table, stats_inputs=stats_inputs,
        candidate_nsamples=args.candidate_nsamples,
        fitness_data=args.fitness_data, enqueue=args.enqueue or [], drop_scan=args.drop_scan,
        drop_run=args.drop_run, **effort,
    )
    chosen = default_selection(args.model is None, device)
    selection = Selection(0 if multi else chosen.top if args.select_top is None else args.select_top,
                          chosen.samples if args.select_samples is None else args.select_samples)
    time_budget = parse_duration(args.time_budget) if args.time_budget else None
    out = Path(args.out)
    guide = None
    if (args.predictor or ("off" if multi or width else "on")) == "on":
        from search.guided import Guide, GuideConfig

        guide = Guide(GuideConfig(init=args.predictor_init, realize=args.realize_top))
    elif args.predictor_init or args.realize_top:
        raise UsageError(f"{'--predictor-init' if args.predictor_init else '--realize-top'} needs --predictor on")
    report_ppl = tuple(d for d in args.report_ppl.split(",") if d)
    if args.report_limit is None:
        args.report_limit = default_report_limit(args.model is None, device)
    cache_dir = args.cache_dir and Path(args.cache_dir)
    if staged:
        return _coarse_to_fine(args, settings, out, guide, time_budget, device, selection, report_ppl, cache_dir)
    summary = run_search(settings, out, args.trials, time_budget, args.workers, args.storage, args.study,
                         device, args.batch_size, report_ppl, args.report_limit or None, not args.quiet, guide,
                         cache_dir, args.heartbeat, selection)
    if summary.get("stopped"):
        print(f"prunesearch: {summary['stopped']}; the trials so far are kept in {out}", file=sys.stderr)
        return 1
    _print_summary(summary, out)
    return 130 if summary.get("interrupted") else 0


def _coarse_to_fine(args, settings, out: Path, guide, time_budget: float | None, device: str, selection,
                    report_ppl: tuple[str, ...], cache_dir: Path | None) -> int:
    """``--granularity block,projection``: both stages (``search.stages``), each stage's table as it ends, then
    the step from the block answer to the final one."""
    from functools import partial

    from search.stages import run_stages
    from search.study import run_search

    fine_guide = None
    if args.predictor == "on":
        from search.guided import Guide, GuideConfig

        fine_guide = Guide(GuideConfig(init=args.predictor_init, realize=args.realize_top))

    def show(name: str, summary: dict, folder: Path) -> None:
        if not summary.get("stopped"):
            print(f"\n== stage {name} ({folder}) ==")
            _print_summary(summary, folder)

    run = partial(run_search, trials=args.trials, workers=args.workers, storage=args.storage, device=device,
                  batch_size=args.batch_size, progress=not args.quiet, heartbeat=args.heartbeat, selection=selection)
    result = run_stages(settings, out, run, args.sampler, (guide, fine_guide), time_budget, cache_dir, args.study,
                        report_ppl, args.report_limit or None, show)
    summaries = result["stages"]
    last = summaries[list(summaries)[-1]]
    if last.get("stopped"):
        print(f"prunesearch: {last['stopped']}; the trials so far are kept in {out}", file=sys.stderr)
        return 1
    if last.get("interrupted") or len(summaries) < 2 or last.get("best") is None:
        return 130 if last.get("interrupted") else 0
    coarse, fine = summaries["block"]["best"], last["best"]
    start = next((v for k, v in last["seeds"].items() if k.startswith("start:")), None)
    snapped = f" ({start['fitness']:.5f} on the projection grid)" if start else ""
    print(f"\ncoarse to fine: block answer (trial {coarse['trial']}) {coarse['fitness']:.5f}{snapped} -> "
          f"projection answer (trial {fine['trial']}) {fine['fitness']:.5f} {last['fitness_kind']} on the search "
          f"data; the answer is {out / result['final']} (export, report and realize --run take {out})")
    return 0


def _report_columns(summary: dict) -> tuple[list[str], Callable[[str], str]]:
    """Header cells and a row formatter for the report data (KL to dense and PPL per dataset) of a summary."""
    ppl, kl = summary.get("report_ppl", {}), summary.get("report_kl", {})
    datasets = list(next(iter(ppl.values()), {}))
    header = [f"{d + ' ' + m:>16}" for d in datasets for m in ("kl", "ppl")]

    def cells(label: str) -> str:
        if label not in ppl:
            return " ".join(f"{'':>16}" for _ in header)
        return " ".join(f"{kl[label][d]:>16.5f} {ppl[label][d]:>16.3f}" for d in datasets)

    return header, cells


def _print_summary(summary: dict, out: Path) -> None:
    if summary.get("best", 0) is None:
        print(f"no trial completed; everything so far is kept in {out}")
        return
    if "front" in summary:
        _print_front(summary, out)
        return
    kind = summary["fitness_kind"]
    header, cells = _report_columns(summary)
    print(f"\n{'allocation':<18} {kind + ' (search data)':>20} " + " ".join(header))
    rows = [("best", summary["best"]["fitness"])] + [(k, v["fitness"]) for k, v in summary["seeds"].items()]
    for label, fit in rows:
        print(f"{label:<18} {fit:>20.5f} " + cells(label))
    if "selection" in summary:
        _print_selection(summary["selection"], kind)
    alloc = ", ".join(f"{k}: {v:.3f}" for k, v in summary["best"]["allocation"].items())
    print(f"best ({summary['best']['label']}, trial {summary['best']['trial']}): {alloc}")
    print(f"{summary['trials']} trials ({summary['pruned']} stopped early at low fidelity), "
          f"median trial {summary['median_trial_s']:.2f}s; results in {out}")


def _print_selection(selection: dict, kind: str) -> None:
    p = selection["protocol"]
    n, top = len(selection["finalists"]), p["top"]
    which = f"the {n} best" if n <= top else f"the {top} best, then starts or best realized"
    print(f"\nfinal selection: {which}, {p['realized_with']}, on {p['samples']} fresh held-out sequences ({kind}):")
    for row in selection["finalists"]:
        mark = "  <- chosen" if row["trial"] == selection["chosen"] else ""
        print(f"  trial {row['trial']:>5} {row['label']:<12} search {row['search_fitness']:.5f}  "
              f"selection {row['selection_fitness']:.5f}{mark}")


def _print_front(summary: dict, out: Path) -> None:
    kind = summary["fitness_kind"]
    print(f"\nPareto front ({len(summary['front'])} allocations; configs in {out / 'pareto'}):")
    print(f"{'sparsity':>9} {kind:>10} {'trial':>6}  label")
    for row in summary["front"]:
        print(f"{row['sparsity']:>9.4f} {row['fitness']:>10.5f} {row['trial']:>6}  {row['label']}")
    print("\nEach seed against the best front allocation at least as sparse (front@budget):")
    header, cells = _report_columns(summary)
    print(f"{'allocation':<16} {'sparsity':>9} {kind + ' (search data)':>20} " + " ".join(header))
    for label, v in summary["seeds"].items():
        budget = label.partition("@")[2]
        front = v["front"]
        if label.startswith("uniform@") and front is not None:
            print(f"{'front@' + budget:<16} {front['sparsity']:>9.4f} {front['fitness']:>20.5f} "
                  + cells(f"front@{budget}"))
        print(f"{label:<16} {v['sparsity']:>9.4f} {v['fitness']:>20.5f} " + cells(label))
    print(f"{summary['trials']} trials, median trial {summary['median_trial_s']:.2f}s; results in {out}")
