"""Allocation quality: the best allocation found in N trials against uniform, OWL and ATP, on report data.

The search measures KL to the dense model on held-out C4 tokens; the table reports WikiText-2 *test* perplexity
and KL of each allocation realized with the real sequential one-shot pruner, on data the search never saw. Also
records anytime curves (best fitness vs real evaluations and vs wall time) per sampler (``guided`` is TPE under
the boosted-tree predictor, the search's default), the wall time of each search, and optionally a
multi-objective NSGA-II run over a budget range. Writes results/benchmarks/search_quality[-NAME].{json,md},
search_anytime[-NAME].{csv,png} (and search_front.png).

    python benchmarks/search_quality.py [--model smollm2-135m] [--budgets 0.6,0.7] [--samplers guided,evo] \
        [--trials 100] [--report-limit 128] [--front 0.6:0.8] [--data-dir ../shared/data] [--name smollm2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from prunesearch.sources import mix_parts
from pruners.methods import get_method, names
from search.engine import (SearchSettings, Selection, default_effort, default_selection, default_stats_inputs,
                           run_search)
from search.settings import DEFAULT_STATS_INPUTS
from search.guided import Guide, GuideConfig
from search.seeds import START

FITNESS_TEXT = {"c4": ("C4", "docs 900-949 of the bundled sample"),  # what each held-out source is, for the tables
                "wikitext2": ("WikiText-2", "the validation split, never the test split"),
                "ptb": ("PTB", "the validation split, never the test split")}


def anytime(frame: pd.DataFrame) -> pd.DataFrame:
    """Best completed fitness after each real evaluation (pruned trials count: they cost a forward pass; re-uses
    of an earlier measurement do not)."""
    frame = frame[frame.state.isin(["COMPLETE", "PRUNED"]) & frame.duplicate_of.isna()]
    frame = frame.sort_values("number").reset_index(drop=True)
    best = frame.fitness.where(frame.state == "COMPLETE").cummin().ffill()
    return pd.DataFrame({"evaluations": range(1, len(frame) + 1), "wall_s": frame.wall_s.cumsum(), "best": best})


def search(settings: SearchSettings, run: Path, sampler: str, args) -> tuple[dict, float]:
    """One search of ``args.trials`` trials (timed: set-up plus trials), then its report (seeds and best realized
    for real) when ``args.report`` names datasets; returns (summary, search wall seconds)."""
    guide = Guide(GuideConfig(seed=settings.seed)) if sampler == "guided" else None
    common = dict(trials=args.trials, device=args.device, progress=False, cache_dir=args.cache_dir,
                  selection=args.selection)
    t = time.perf_counter()
    summary = run_search(settings, run, report_ppl=(), guide=guide, **common)
    wall = time.perf_counter() - t
    if args.report:
        summary = run_search(settings, run, report_ppl=tuple(args.report.split(",")),
                             report_limit=args.report_limit or None, **common)
    return summary, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model (default: the built-in one)")
    ap.add_argument("--pruner", default="wanda", choices=names(searchable=True))
    ap.add_argument("--budgets", default="0.7,0.8")
    ap.add_argument("--samplers", default="guided,evo", help="comma list of guided, tpe, qmc, evo; the first one's "
                                                              "best is realized and reported beside the seeds")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--level-step", type=float, default=0.025, help="sparsegpt level grid step")
    ap.add_argument("--granularity", default="block", choices=["block", "projection"])
    ap.add_argument("--fitness-data", default="c4", help="held-out text of the search's fitness: c4, wikitext2 "
                                                          "or ptb (their validation split), or a mix: c4+wikitext2")
    ap.add_argument("--stats-inputs", choices=["dense", "pruned", "candidate"],
                    help="the ranks' / level database's statistics from dense inputs or through pruned blocks, or "
                         "every candidate pruned for real (default: the search's, search.settings)")
    ap.add_argument("--select-top", type=int, help="finalists pruned for real and re-measured on fresh windows "
                                                    "(default: the search's, search.selection.DEFAULTS; 0: none)")
    ap.add_argument("--enqueue", action="append", default=[], metavar="CONFIG",
                    help="a sparsity config measured first (e.g. a block-level run's best_config.json to start a "
                         "projection-level search from); listed apart from the heuristics")
    ap.add_argument("--report", default="wikitext2", help="report datasets ('' for none)")
    ap.add_argument("--report-limit", type=int, default=0, help="windows per report dataset (0: the whole stream)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir")
    ap.add_argument("--cache-dir", help="shared cache of ranks / level database / dense reference")
    ap.add_argument("--runs", default="results/bench_runs", help="where the run folders go (not committed)")
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--name", default="", help="suffix of the output files")
    ap.add_argument("--front", default="", help="sparsity range of a multi-objective run (e.g. 0.6:0.8)")
    args = ap.parse_args()
    args.stats_inputs = (args.stats_inputs or default_stats_inputs(args.model is None, args.pruner, "sparsity")
                         or DEFAULT_STATS_INPUTS[get_method(args.pruner).realizer])
    out, suffix = Path(args.out), f"-{args.name}" if args.name else ""
    out.mkdir(parents=True, exist_ok=True)
    effort = default_effort(args.model is None, args.device)
    chosen = default_selection(args.model is None, args.device)
    args.selection = Selection(chosen.top if args.select_top is None else args.select_top, chosen.samples)
    samplers = args.samplers.split(",")
    summary: dict = {"protocol": {"model": args.model or "built-in", "pruner": args.pruner, "trials": args.trials,
                                  "granularity": args.granularity, "stats_inputs": args.stats_inputs,
                                  "fitness_data": args.fitness_data, "selection": vars(args.selection),
                                  "enqueue": args.enqueue,
                                  "effort": effort, "device": args.device,
                                  "host": platform.node(), "threads": torch.get_num_threads(),
                                  "report": args.report, "report_windows": args.report_limit or "all"}}
    curves = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for sampler in samplers:
            settings = SearchSettings(model=args.model, budget=f"sparsity={budget}", pruner=args.pruner,
                                      sampler="tpe" if sampler == "guided" else sampler, data_dir=args.data_dir,
                                      granularity=args.granularity, level_step=args.level_step,
                                      stats_inputs=args.stats_inputs, fitness_data=args.fitness_data,
                                      enqueue=args.enqueue, **effort)
            run = Path(args.runs) / f"{args.name or 'builtin'}-{args.pruner}-s{budget:g}-{sampler}"
            report = args.report if sampler == samplers[0] else ""
            s, wall = search(settings, run, sampler, argparse.Namespace(**{**vars(args), "report": report}))
            s["search_wall_s"] = wall
            summary[f"{budget:g}/{sampler}"] = s
            curve = anytime(pd.read_parquet(run / "trials.parquet"))
            curve["budget"], curve["sampler"] = budget, sampler
            curves.append(curve)
            seeds = s["seeds"]
            best_seed = min(seeds, key=lambda k: seeds[k]["fitness"])
            print(f"sparsity {budget:g} {sampler}: best KL {s['best']['fitness']:.5f} vs best seed {best_seed} "
                  f"{seeds[best_seed]['fitness']:.5f}; {wall / 60:.1f} min", flush=True)
    curves_df = pd.concat(curves)
    curves_df.to_csv(out / f"search_anytime{suffix}.csv", index=False)
    if args.front:
        run = Path(args.runs) / f"{args.name or 'builtin'}-front-{args.front.replace(':', '-')}"
        settings = SearchSettings(model=args.model, budget=f"sparsity={args.front}", sampler="nsga2",
                                  data_dir=args.data_dir, **effort)
        summary["front"] = run_search(settings, run, trials=args.trials, device=args.device,
                                      report_ppl=tuple(args.report.split(",")), report_limit=args.report_limit or None,
                                      progress=False, cache_dir=args.cache_dir)
        shutil.copy(run / "pareto.png", out / f"search_front{suffix}.png")
    (out / f"search_quality{suffix}.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = markdown(summary, args, samplers, curves_df, effort)
    if args.front:
        lines += front_section(summary["front"], args.front, args.trials)
    (out / f"search_quality{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(curves_df, out / f"search_anytime{suffix}.png")
    print("\n".join(lines))


def markdown(summary: dict, args, samplers: list[str], curves: pd.DataFrame, effort: dict) -> list[str]:
    """The tables: per budget, every seed and the searched allocation on search KL and report data; then the
    anytime table and the search wall times."""
    first = samplers[0]
    data = args.report.split(",")[0] if args.report else None
    windows = f"the first {args.report_limit} windows" if args.report_limit else "the full stream"
    parts = mix_parts(args.fitness_data)
    fitness_text = " / ".join(FITNESS_TEXT[p][0] for p in parts)
    fitness_where = ("alternating; " if len(parts) > 1 else "") + ", ".join(FITNESS_TEXT[p][1] for p in parts)
    realized_from = "level database" if get_method(args.pruner).realizer == "levels" else "ranks"
    realized_from += {"pruned": " (statistics through blocks pruned at the budget)",
                      "candidate": " (every candidate pruned for real, sequentially)"}.get(
        args.stats_inputs, " (statistics from dense inputs)")
    lines = ["# Allocation search vs heuristic allocations", "",
             f"Model {args.model or 'built-in'}, {args.pruner} {realized_from}, "
             f"unstructured, {args.granularity} granularity, {args.trials} trials per run, device {args.device}. "
             f"Search fitness: KL to the dense model on {effort['fitness_samples']} held-out {fitness_text} "
             f"sequences of {effort.get('seqlen', 256)} tokens ({fitness_where}; the first "
             f"{effort['low_fidelity_samples']} are the early-stopping rung), calibration {effort['nsamples']} C4 "
             f"sequences (seed 0). Report: {data} test perplexity and KL to dense on {windows} at the same seqlen, "
             f"each allocation realized with the sequential one-shot {args.pruner}; the search never saw that data. "
             f"Seeds: uniform, OWL (M=5, λ=0.08) and ATP's slope grid; `{first}` is the reported search."]
    if args.enqueue:
        lines[-1] += (f" The search also starts from {', '.join(f'`{Path(c).name}`' for c in args.enqueue)} "
                      f"(`--enqueue`, the `start:` row: not a heuristic).")
    if realized_from.startswith("level") and args.granularity == "projection":
        lines[-1] += (" Every allocation, seeds included, is snapped to this space's level grid (one level is the "
                      f"same number of weights, so small projections move in coarse steps: {args.level_step:g} on "
                      "an average-size unit); the seeds therefore differ slightly from a block-level run's.")
    lines.append("")
    for key, s in summary.items():
        if "/" not in key or not key.endswith("/" + first):
            continue
        budget = key.split("/")[0]
        lines += [f"## {float(budget):.0%} unstructured", ""]
        if data:
            ppl, kl = s["report_ppl"], s["report_kl"]
            heur = min((k for k in s["seeds"] if not k.startswith(START)), key=lambda k: ppl[k][data])
            lines += [f"Searched / best heuristic ({heur}) {data} PPL: "
                      f"**{ppl['best'][data] / ppl[heur][data]:.3f}×**.", "",
                      f"| allocation | search KL | {data} KL to dense | {data} PPL |", "|---|---|---|---|"]
        else:
            lines += ["| allocation | search KL |", "|---|---|"]
        for label, fitness in [("best", s["best"]["fitness"])] + [(k, v["fitness"]) for k, v in s["seeds"].items()]:
            name = f"searched ({first})" if label == "best" else label
            row = f"| {name} | {fitness:.5f} |"
            if data:
                row += f" {kl[label][data]:.5f} | {ppl[label][data]:.3f} |"
            lines.append(row)
        lines.append("")
        lines += selection_section(s)
    lines += ["## Anytime: best search KL after N real evaluations (seeds included), and search time", "",
              "Trials (min): the summed wall time of the measured trials; run (min): the whole search of this "
              "process (set-up from the shared caches, trials, results; for a run found finished, only loading "
              "it).", "",
              "| budget | sampler | 10 | 25 | 50 | 100 | best seed | trials (min) | run (min) | median trial (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (budget, sampler), g in curves.groupby(["budget", "sampler"], sort=False):
        s = summary[f"{budget:g}/{sampler}"]
        cells = [f"{g.best.iloc[min(n, len(g)) - 1]:.5f}" for n in (10, 25, 50, 100)]
        seed_best = min(v["fitness"] for v in s["seeds"].values())
        lines.append(f"| {budget:g} | {sampler} | " + " | ".join(cells) +
                     f" | {seed_best:.5f} | {g.wall_s.iloc[-1] / 60:.1f} | {s['search_wall_s'] / 60:.1f} | "
                     f"{s['median_trial_s']:.1f} |")
    return lines


def selection_section(s: dict) -> list[str]:
    """The final selection's finalists: search KL and KL pruned for real on fresh held-out windows."""
    if "selection" not in s:
        return []
    sel = s["selection"]
    p = sel["protocol"]
    lines = [f"Final selection (`search.selection`): the {len(sel['finalists'])} best by search KL, "
             f"{p['realized_with']}, on {p['samples']} fresh {p['windows']}; the searched row above is the lowest "
             f"(trial {sel['chosen']}); {sum(r['wall_s'] for r in sel['finalists']) / 60:.1f} min.", "",
             "| trial | label | search KL | pruned for real, fresh windows |", "|---|---|---|---|"]
    for r in sel["finalists"]:
        mark = "**" if r["trial"] == sel["chosen"] else ""
        lines.append(f"| {mark}{r['trial']}{mark} | {r['label']} | {r['search_fitness']:.5f} | "
                     f"{mark}{r['selection_fitness']:.5f}{mark} |")
    return lines + [""]


def front_section(s: dict, budget_range: str, trials: int) -> list[str]:
    """The multi-objective run: its Pareto front, then each seed against the best front allocation as sparse."""
    lines = ["", f"## Pareto front over sparsity {budget_range} (nsga2, {trials} trials, one run)", "",
             "Each trial samples one of 21 budget levels across the range; the seeds are measured at both ends and "
             "the middle. `front@p` is the front allocation with the lowest search KL among those at least p sparse "
             "(plot: search_front.png).", "", "| sparsity | search KL | trial | label |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.4f} | {r['fitness']:.5f} | {r['trial']} | {r['label']} |" for r in s["front"]]
    lines += ["", "| allocation | sparsity | search KL | WikiText-2 KL to dense | WikiText-2 PPL |",
              "|---|---|---|---|---|"]
    kl, ppl = s["report_kl"], s["report_ppl"]
    for label, v in s["seeds"].items():
        budget = label.partition("@")[2]
        if label.startswith("uniform@") and v["front"] is not None:
            f = v["front"]
            lines.append(f"| **front@{budget}** | {f['sparsity']:.4f} | {f['fitness']:.5f} | "
                         f"{kl['front@' + budget]['wikitext2']:.5f} | {ppl['front@' + budget]['wikitext2']:.3f} |")
        lines.append(f"| {label} | {v['sparsity']:.4f} | {v['fitness']:.5f} | {kl[label]['wikitext2']:.5f} | "
                     f"{ppl[label]['wikitext2']:.3f} |")
    return lines


def plot(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(curves.budget.unique())
    fig, axes = plt.subplots(2, len(budgets), figsize=(5 * len(budgets), 7), squeeze=False)
    for j, budget in enumerate(budgets):
        for sampler, g in curves[curves.budget == budget].groupby("sampler", sort=False):
            axes[0][j].plot(g.evaluations, g.best, label=sampler)
            axes[1][j].plot(g.wall_s, g.best, label=sampler)
        axes[0][j].set(title=f"{budget:.0%} unstructured", xlabel="real evaluations", ylabel="best KL")
        axes[1][j].set(xlabel="wall time (s)", ylabel="best KL")
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
