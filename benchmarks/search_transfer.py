"""Does a searched allocation's advantage carry over beyond the search data? Diagnoses a finished search run.

The best allocations of a run and its seeds are realized two ways (the search's: ranks from dense calibration
inputs; the report's: sequential one-shot pruning) and measured on data the search never used: KL to the dense
model on fresh C4 windows (other seeds) and on WikiText-2 test, and perplexity on both. If the searched
allocation wins on fresh C4 too, the search did not overfit its fitness tokens; if it wins on WikiText-2 KL but
loses on WikiText-2 perplexity, the two measures disagree on that data, not the search.

    python benchmarks/search_transfer.py results/bench_runs/s0.7-tpe [--top 5] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from prunesearch import data
from prunesearch.evaluate import DenseReference, window_nll, windows
from pruners.masks import Target
from pruners.oneshot import make_pruner, prune_model
from search.engine import SearchSettings, Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished single-budget search run folder")
    ap.add_argument("--top", type=int, default=5, help="best allocations of the run to check (default: 5)")
    ap.add_argument("--seeds", default="uniform,owl,atp-0.05")
    ap.add_argument("--fresh-samples", type=int, default=64, help="fresh C4 windows per check seed (default: 64)")
    ap.add_argument("--wiki-windows", type=int, default=128, help="WikiText-2 test windows (default: 128)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/benchmarks")
    args = ap.parse_args()
    run = Path(args.run)
    settings = SearchSettings(**json.loads((run / "run_config.json").read_text()))
    ws = Workspace(settings, run, args.device)
    frame = pd.read_parquet(run / "trials.parquet")
    done = frame[frame.state == "COMPLETE"].sort_values("fitness")
    cols = [f"s[{u}]" for u in ws.space.units]
    picks = [(f"best #{i + 1}", r) for i, (_, r) in enumerate(done.head(args.top).iterrows())]
    picks += [(label, done[done.label == label].iloc[0]) for label in args.seeds.split(",")]

    model, tok = ws.model, ws.tokenizer
    fresh = {s: data.heldout_ids(tok, args.fresh_samples, ws.seqlen, s, settings.data_dir) for s in (11, 12)}
    wiki = windows(data.eval_ids(tok, "wikitext2", settings.data_dir), ws.seqlen, args.wiki_windows)
    sets = {**{f"C4 seed {s}": ids for s, ids in fresh.items()}, "WikiText-2": wiki}
    refs = {name: DenseReference.compute(model, ids) for name, ids in sets.items()}
    calib = ws.calibration_ids()
    rows = []
    for label, r in picks:
        alloc = r[cols].to_numpy(np.float64)
        for how in ("search", "sequential"):
            ws.realizer.apply({})
            if how == "search":
                ws.realize(alloc)
            else:
                targets = {n: Target(v, ws.m) for n, v in ws.space.to_targets(alloc).items()}
                prune_model(model, make_pruner(settings.pruner), targets, calib)
            row = {"allocation": label, "trial": int(r.number), "realized": how, "search KL": r.fitness}
            row.update({f"KL {name}": ref.kl(model) for name, ref in refs.items()})
            row.update({f"PPL {name}": math.exp(float(window_nll(model, ids).mean()))
                        for name, ids in (("C4 seed 11", fresh[11]), ("WikiText-2", wiki))})
            rows.append(row)
            print(row, flush=True)
    ws.realizer.apply({})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "search_transfer.csv", index=False)
    lines = ["# Does the searched allocation transfer?", "",
             f"Run: `{run.name}` ({settings.budget}, {settings.pruner}, {settings.sampler}, search fitness KL on "
             f"{settings.fitness_samples} x {ws.seqlen} held-out C4 tokens, seed {settings.seed}). Fresh C4: "
             f"{args.fresh_samples} other windows of the held-out documents (window seeds 11 and 12). WikiText-2: "
             f"first {args.wiki_windows} test windows. `search` = the search's realization (ranks from dense "
             "calibration inputs), `sequential` = one-shot pruning block by block, as `prune --config` does.", "",
             "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    (out / "search_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
