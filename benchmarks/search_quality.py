"""Allocation quality: the best allocation found in N trials against uniform, OWL and ATP, on report data.

The search measures KL on held-out C4 tokens; the table reports WikiText-2 *test* perplexity of each allocation
realized with the real sequential one-shot Wanda pruner, data the search never saw. Also records anytime curves
(best fitness vs real evaluations and vs wall time) per sampler, and a multi-objective NSGA-II run over a budget
range (its Pareto front against the seeds at both ends and the middle). Writes
results/benchmarks/search_*.{json,md,png,csv}.

    python benchmarks/search_quality.py [--budgets 0.7,0.8] [--samplers tpe,qmc,evo] [--trials 100] [--front 0.6:0.8]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from search.engine import SearchSettings, run_search


def anytime(frame: pd.DataFrame) -> pd.DataFrame:
    """Best completed fitness after each real evaluation (pruned trials count: they cost a forward pass; re-uses
    of an earlier measurement do not)."""
    frame = frame[frame.state.isin(["COMPLETE", "PRUNED"]) & frame.duplicate_of.isna()]
    frame = frame.sort_values("number").reset_index(drop=True)
    best = frame.fitness.where(frame.state == "COMPLETE").cummin().ffill()
    return pd.DataFrame({"evaluations": range(1, len(frame) + 1), "wall_s": frame.wall_s.cumsum(), "best": best})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--budgets", default="0.7,0.8")
    ap.add_argument("--samplers", default="tpe,qmc,evo")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", default="results/bench_runs", help="where the run folders go (not committed)")
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--front", default="0.6:0.8", help="sparsity range of the multi-objective run ('' for none)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    curves = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for sampler in args.samplers.split(","):
            settings = SearchSettings(model=args.model, budget=f"sparsity={budget}", sampler=sampler)
            run = Path(args.runs) / f"s{budget:g}-{sampler}"
            report = ("wikitext2",) if sampler == args.samplers.split(",")[0] else ()
            s = run_search(settings, run, trials=args.trials, device=args.device, report_ppl=report, progress=False)
            summary[f"{budget:g}/{sampler}"] = s
            curve = anytime(pd.read_parquet(run / "trials.parquet"))
            curve["budget"], curve["sampler"] = budget, sampler
            curves.append(curve)
            print(f"sparsity {budget:g} {sampler}: best KL {s['best']['fitness']:.5f} "
                  f"(uniform {s['seeds']['uniform']['fitness']:.5f})", flush=True)
    curves_df = pd.concat(curves)
    curves_df.to_csv(out / "search_anytime.csv", index=False)
    if args.front:
        run = Path(args.runs) / f"front-{args.front.replace(':', '-')}"
        settings = SearchSettings(model=args.model, budget=f"sparsity={args.front}", sampler="nsga2")
        summary["front"] = run_search(settings, run, trials=args.trials, device=args.device,
                                      report_ppl=("wikitext2",), progress=False)
        shutil.copy(run / "pareto.png", out / "search_front.png")
    (out / "search_quality.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = ["# Allocation search vs heuristic allocations", "",
             f"Default model, Wanda scores, unstructured, block granularity, {args.trials} trials per run. "
             "Search fitness: KL to the dense model on 32 x 256 held-out C4 tokens (docs 900-999 of the bundled "
             "sample; the first 8 sequences are the early-stopping rung). Report: WikiText-2 test perplexity (full "
             "stream, seqlen 256) of each allocation realized with sequential one-shot Wanda (128 x 256 C4 "
             "calibration tokens, seed 0), and its KL to the dense model on the same windows; the search never saw "
             "them.", ""]
    first = args.samplers.split(",")[0]
    for budget in args.budgets.split(","):
        s = summary[f"{float(budget):g}/{first}"]
        lines += [f"## {float(budget):.0%} unstructured ({first})", "",
                  "| allocation | search KL | WikiText-2 KL to dense | WikiText-2 PPL |", "|---|---|---|---|"]
        for label, fitness in [("best", s["best"]["fitness"])] + [(k, v["fitness"]) for k, v in s["seeds"].items()]:
            lines.append(f"| {'searched (best)' if label == 'best' else label} | {fitness:.5f} | "
                         f"{s['report_kl'][label]['wikitext2']:.5f} | {s['report_ppl'][label]['wikitext2']:.3f} |")
        lines.append("")
    lines += ["## Anytime: best KL after N real evaluations", "", "| budget | sampler | 10 | 25 | 50 | 100 |",
              "|---|---|---|---|---|---|"]
    for (budget, sampler), g in curves_df.groupby(["budget", "sampler"], sort=False):
        cells = [f"{g.best.iloc[min(n, len(g)) - 1]:.5f}" for n in (10, 25, 50, 100)]
        lines.append(f"| {budget:g} | {sampler} | " + " | ".join(cells) + " |")
    if args.front:
        lines += front_section(summary["front"], args.front, args.trials)
    (out / "search_quality.md").write_text("\n".join(lines) + "\n")
    plot(curves_df, out / "search_anytime.png")
    print("\n".join(lines))


def front_section(s: dict, budget_range: str, trials: int) -> list[str]:
    """The multi-objective run: its Pareto front, then each seed against the best front allocation as sparse."""
    lines = ["", f"## Pareto front over sparsity {budget_range} (nsga2, {trials} trials, one run)", "",
             "Each trial samples one of 21 budget levels across the range; the seeds are measured at both ends and "
             "the middle. `front@p` is the front allocation with the lowest search KL among those at least p sparse "
             "(plot: search_front.png).", "", "| sparsity | search KL | trial | label |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.4f} | {r['fitness']:.5f} | {r['trial']} | {r['label']} |" for r in s["front"]]
    lines += ["", "| allocation | sparsity | search KL | WikiText-2 KL to dense | WikiText-2 PPL |", "|---|---|---|---|---|"]
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
