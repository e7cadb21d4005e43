"""Prospective ranking: can the predictor, trained on a finished run's first n measured trials, rank its next ones?

This is what the guided search asks of it mid-run (pick the next candidates among unmeasured ones), unlike the
K-fold τ of `predictor retrain`, which mixes early and late trials. Reads finished run folders only (no model):
for each run and each n, an ensemble is fitted on the first n completed, distinct trials and scored by Kendall τ
on the next ``--next``. Runs that start from a seed allocation and move locally (the evolution, the second stage
of coarse to fine) ask the predictor to rank near neighbours, global runs (TPE, guided) far-apart allocations.

    PYTHONPATH=. python benchmarks/predictor_prospective.py --runs RUN [RUN ...] --out results/benchmarks/NAME.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from predictors.features import make_spec
from predictors.metrics import ranking_metrics
from predictors.model import FitnessPredictor
from predictors.pairs import run_pairs


def prospective(run: Path, sizes: list[int], nxt: int, members: int) -> list[dict]:
    """τ of a predictor fitted on the run's first n pairs (trial order), scored on the next ``nxt`` pairs."""
    pairs = run_pairs(run, make_spec(8))
    config = json.loads((run / "run_config.json").read_text())
    rounds = run / "predictor_rounds.jsonl"
    sampler = "guided" if rounds.is_file() and rounds.stat().st_size else config.get("sampler", "?")
    sampler += ", from a start config" if config.get("enqueue") else ""
    rows = []
    for n in sizes:
        if len(pairs.y) < n + nxt:
            continue
        test = slice(n, n + nxt)
        model = FitnessPredictor(n_members=members, random_state=0).fit(pairs.X[:n], pairs.y[:n])
        m = ranking_metrics(pairs.y[test], model.predict(pairs.X[test]))
        rows.append({"run": str(run), "sampler": sampler, "granularity": config.get("granularity"), "train": n,
                     "tau": m["kendall_tau"], "next_std": float(np.std(pairs.y[test])),
                     "next_range": float(np.ptp(pairs.y[test]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished sparsity search run folders")
    ap.add_argument("--sizes", default="20,35,50", help="training pairs (the first n of each run)")
    ap.add_argument("--next", type=int, default=20, help="pairs ranked after the training ones")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--out", required=True, help="markdown file to write (a .csv beside it)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    frame = pd.DataFrame([r for run in args.runs for r in prospective(Path(run), sizes, args.next, args.members)])
    out = Path(args.out)
    frame.to_csv(out.with_suffix(".csv"), index=False)
    lines = ["# Prospective ranking of the accuracy predictor on finished runs", "",
             f"Each run's completed, distinct trials in trial order; predictor ({args.members}-member bootstrap "
             f"XGBoost, log target, features spec v1 with 8 depth bins) fitted on the first n, Kendall τ on the next "
             f"{args.next}; `next std` is the fitness spread of those {args.next}.", "",
             "| run | sampler | granularity | " + " | ".join(f"τ @{n}" for n in sizes) + " | next std @"
             f"{sizes[0]} |", "|---|---|---|" + "---|" * (len(sizes) + 1)]
    root = os.path.commonpath([str(Path(r).parent) for r in args.runs])
    for run, g in frame.groupby("run", sort=False):
        taus = {int(r.train): r.tau for r in g.itertuples()}
        cells = [f"{taus[n]:.2f}" if n in taus else "–" for n in sizes]
        lines.append(f"| {os.path.relpath(run, root)} | {g.sampler.iloc[0]} | {g.granularity.iloc[0]} | "
                     + " | ".join(cells) + f" | {g.next_std.iloc[0]:.4f} |")
    means = frame.groupby("sampler").tau.mean()
    lines += ["", f"Runs under `{root}`. Mean τ by sampler: " + ", ".join(f"{s} {v:.2f}" for s, v in means.items()), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
