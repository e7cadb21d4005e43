"""The commands that take a finished search further: ``export``, ``report`` and ``realize``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pruners.methods import METHODS, modifiers
from prunesearch.commands.common import UsageError, check_wbits, log, perplexities, print_sparsity, print_widths
from prunesearch.commands.options import add_calib_options, add_model_options
from prunesearch.safety import check_out


def add_commands(sub) -> None:
    """Register the subcommands on the ``prunesearch`` parser's subparsers."""
    p = sub.add_parser("export", help="export the best allocations of a search as prune configs or an "
                                      "llm-compressor recipe",
                       description="Export a finished search's best allocations (with their fitness and protocol).")
    p.add_argument("--run", required=True, help="search run folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--top", type=int, help="the K best measured allocations (default: the best one)")
    which.add_argument("--pareto", action="store_true", help="the Pareto front of a budget-range run")
    p.add_argument("--format", default="json", choices=["json", "yaml", "llmcompressor"],
                   help="json/yaml: files `prune --config` reads; llmcompressor: a recipe for llmcompressor.oneshot "
                        "(default: json)")
    p.add_argument("--modifier", choices=list(modifiers()),
                   help=f"llmcompressor only: {' or '.join(modifiers().values())} (default: the search pruner's "
                        "own, else wanda)")
    p.add_argument("--model", help="llmcompressor only: the model folder, if it moved since the search")
    p.add_argument("--out", required=True, help="output file (one allocation) or folder (several)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="an HTML report (figures embedded) of a finished search",
                       description="Write one self-contained HTML page of a search run, plus its PNG figures.")
    p.add_argument("run", help="search run folder")
    p.add_argument("--out", help="HTML file (default: RUN/report.html); PNGs go to <name>_figures/ beside it")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN2", help="overlay these runs' curves and best "
                                                                           "allocations, and tabulate them")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("realize", help="prune the chosen allocation for real, evaluate it on report data, save it",
                       description="Final one-shot pruning of a search's best allocation (or any config), then "
                                   "perplexity and zero-shot tasks on data the search never saw. A width allocation "
                                   "is sliced (--method width), scored on the search's own calibration data and "
                                   "width score (from the config's meta) unless --calib, --nsamples, --seed or "
                                   "--seqlen say otherwise.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="search run folder (its best_config.json)")
    which.add_argument("--config", help="a config file (export output, best_config.json, pareto/*.json)")
    add_model_options(p)
    add_calib_options(p)
    p.add_argument("--method", choices=[*METHODS, "width"],
                   help="a sparsity allocation needs one of the sparsity methods; a width one is sliced (width, the "
                        "default there)")
    p.add_argument("--wbits", type=int, help="SparseGPT only: also quantize the kept weights to this many bits")
    p.add_argument("--ppl", default="wikitext2,ptb", help="report datasets for perplexity (default: wikitext2,ptb; "
                                                         "ptb needs --data-dir offline; '' for none)")
    p.add_argument("--tasks", help="comma-separated lm-eval zero-shot tasks (see `prunesearch eval --tasks`)")
    p.add_argument("--limit", type=int, help="at most this many windows per dataset / examples per task")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: a from_pretrained folder (default)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_realize, calib=None, nsamples=None, seed=None)  # None: see calibration()


def cmd_export(args: argparse.Namespace) -> int:
    """``prunesearch export``: write the chosen allocations in the chosen format."""
    import shutil

    from prunesearch import export
    from search.stages import final_run

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it")
    if args.format != "llmcompressor" and (args.modifier or args.model):
        raise UsageError("--modifier and --model only work with --format llmcompressor")
    configs = export.select(final_run(args.run), args.top, args.pareto)
    if out.is_dir():  # --overwrite of an earlier multi-file export: no stale files stay behind
        shutil.rmtree(out)
    if args.format == "llmcompressor" and "width" in configs[0]:
        raise UsageError(f"{args.run} is a {configs[0]['meta']['space']} run: llm-compressor recipes prune weights in "
                         "place and cannot remove heads or channels; export --format json or yaml (for prune --method "
                         "width --config), or realize --run")
    lay, method = None, args.modifier
    if args.format == "llmcompressor":
        meta = configs[0]["meta"]
        lay = export.model_layout(args.model or meta["model"])
        method = method or export.modifier_for(meta["pruner"])
    paths = export.write(configs, args.format, out, lay, method)
    for config, path in zip(configs, paths):
        meta = config["meta"]
        share = "removed" if "width" in config else "sparsity"
        print(f"trial {meta['trial']:>5} {meta['fitness_kind']} {meta['fitness']:.5f} {share} "
              f"{meta['budget_sparsity']:.4f} -> {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``prunesearch report``: the HTML page of a run (and the runs it is compared with)."""
    from prunesearch.report import build
    from search.stages import final_run

    run = final_run(args.run)
    out = Path(args.out) if args.out else run / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out must name an .html file, got {out}")
    page, pngs = build(run, out, [final_run(r) for r in args.compare])
    print(f"report: {page} (figures: {', '.join(p.name for p in pngs)} in {pngs[0].parent})")
    return 0


def cmd_realize(args: argparse.Namespace) -> int:
    """``prunesearch realize``: prune the chosen allocation, evaluate it on report data, save it with its report."""
    import json
    import time

    from prunesearch.models import resolve_device
    from prunesearch.pruning import PruneJob, run_prune, save_folder
    from prunesearch.realize import (BothChoice, calibration, check_eval_data, load_choice, method, realize_report,
                                     width_target)
    from search.stages import final_run

    out = check_out(args.out, args.overwrite)
    config, meta, origin = load_choice(args.run and str(final_run(args.run)), args.config)
    width, both = isinstance(config, dict), isinstance(config, BothChoice)
    # widths and sparsity: sliced, then the kept weights pruned with the search's pruner unless told otherwise
    chosen = method(args.method or (meta.get("pruner", "wanda") if both else None), width)
    if width and args.wbits is not None:
        raise UsageError("--wbits quantizes a sparsity allocation's kept weights; a width allocation is sliced")
    if not width:
        check_wbits(chosen, args.wbits)
    calib = calibration(args, meta, width or both)
    datasets = [d for d in args.ppl.split(",") if d]
    check_eval_data(datasets, args.data_dir)
    device = resolve_device(args.device)
    sliced = None
    if both:
        allocate, width_options = width_target(config.width, meta)
        config, sliced = config.sparsity, (allocate, width_options["score"])
    target, options = width_target(config, meta) if width else (config, {"wbits": args.wbits})
    job = PruneJob(target, chosen, options, args.model or meta.get("model"), device, args.dtype, calib["calib"],
                   calib["nsamples"], calib["seed"], calib["seqlen"], args.batch_size, args.data_dir, sliced)
    model, tokenizer, report = run_prune(job, log)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # saved before the evaluation, so that a failing evaluation never loses the pruned model
    save_folder(out, write, "realize_report.json", realize_report(report, meta, origin, args.format, {}), "realize")
    model.to(device)
    seqlen = report["protocol"]["seqlen"]
    t = time.perf_counter()
    evaluation = {"eval_protocol": {"datasets": datasets, "tasks": args.tasks.split(",") if args.tasks else [],
                                    "limit": args.limit, "seqlen": seqlen, "batch_size": args.batch_size}}
    evaluation["ppl"] = perplexities(model, tokenizer, datasets, seqlen, args) if datasets else {}
    if args.tasks:
        from prunesearch.zeroshot import evaluate_tasks

        evaluation["tasks"] = evaluate_tasks(model, tokenizer, args.tasks.split(","), args.data_dir, args.limit,
                                             args.batch_size, device)
    report["timings_s"]["evaluate"] = time.perf_counter() - t
    result = realize_report(report, meta, origin, args.format, evaluation)
    (out / "realize_report.json").write_text(json.dumps(result, indent=2))
    ppl = ", ".join(f"{d} {v['ppl']:.3f}" for d, v in evaluation["ppl"].items())
    if width:
        print_widths(report, out)
        print(f"realized with width ({options['score']} scores){'; ppl ' + ppl if ppl else ''}")
        return 0
    if both:
        print_widths(report["width"], out)
    print_sparsity(report["layers"])
    nonzero = f"; {report['nonzero_params']:,} nonzero parameters" if both else ""
    print(f"realized with {chosen}: global sparsity {report['global_sparsity']:.4f}{nonzero}"
          f"{'; ppl ' + ppl if ppl else ''}; saved to {out}")
    return 0
