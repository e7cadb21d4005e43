"""The commands that take a finished search further: ``export``, ``report`` and ``realize``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunesearch.cli import UsageError


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
    p.add_argument("--modifier", choices=["sparsegpt", "wanda"],
                   help="llmcompressor only: SparseGPTModifier or WandaPruningModifier (default: sparsegpt for a "
                        "sparsegpt search, else wanda)")
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


def cmd_export(args: argparse.Namespace) -> int:
    from prunesearch import export

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it")
    if args.format != "llmcompressor" and (args.modifier or args.model):
        raise UsageError("--modifier and --model only work with --format llmcompressor")
    configs = export.select(Path(args.run), args.top, args.pareto)
    lay, method = None, args.modifier
    if args.format == "llmcompressor":
        meta = configs[0]["meta"]
        lay = export.model_layout(args.model or meta["model"])
        method = method or ("sparsegpt" if meta["pruner"] == "sparsegpt" else "wanda")
    paths = export.write(configs, args.format, out, lay, method or "wanda")
    for config, path in zip(configs, paths):
        meta = config["meta"]
        print(f"trial {meta['trial']:>5} {meta['fitness_kind']} {meta['fitness']:.5f} sparsity "
              f"{meta['budget_sparsity']:.4f} -> {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prunesearch.report import build

    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out must name an .html file, got {out}")
    page, pngs = build(Path(args.run), out, [Path(r) for r in args.compare])
    print(f"report: {page} (figures: {', '.join(p.name for p in pngs)} in {pngs[0].parent})")
    return 0
