"""Trial overhead of the search: median trial wall time divided by a bare forward pass over the same tokens.

A trial realizes an allocation (masks from cached ranks) and computes the KL to the cached dense reference;
the bare pass is the model's forward over the same held-out tokens and nothing else. Both are timed side by
side in one run. Writes results/benchmarks/search_overhead.{json,md}.

    python benchmarks/search_overhead.py [--model DIR] [--device cpu] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from search.engine import SearchSettings, Workspace


@torch.no_grad()
def bare_forward(ws: Workspace) -> float:
    t = time.perf_counter()
    for start in range(0, ws.heldout.shape[0], ws.batch_size):
        ws.model(input_ids=ws.heldout[start:start + ws.batch_size].to(next(ws.model.parameters()).device),
                 use_cache=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="results/benchmarks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(SearchSettings(model=args.model, budget="sparsity=0.7"), Path(tmp), args.device)
        rng = np.random.default_rng(0)
        bare_forward(ws)  # warm-up
        trial, bare = [], []
        for _ in range(args.repeats):
            alloc = ws.allocation(rng.uniform(ws.space.low, ws.space.high, ws.space.dim))
            t = time.perf_counter()
            ws.measure(alloc)
            trial.append(time.perf_counter() - t)
            bare.append(bare_forward(ws))
        ratio = statistics.median(trial) / statistics.median(bare)
        result = {"median_trial_s": statistics.median(trial), "median_bare_forward_s": statistics.median(bare),
                  "ratio": ratio, "repeats": args.repeats, "tokens": int(ws.heldout.numel()),
                  "model": ws.source, "device": args.device, "threads": torch.get_num_threads(),
                  "trial": "realize masks from cached Wanda ranks + KL on all fitness tokens (no early stop)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_overhead.json").write_text(json.dumps(result, indent=2))
    text = (f"# Search trial overhead\n\nMedian trial {result['median_trial_s']:.3f}s vs bare forward "
            f"{result['median_bare_forward_s']:.3f}s over the same {result['tokens']} held-out tokens: "
            f"**{ratio:.3f}x** (goal <= 1.2). {args.repeats} random on-budget allocations at 70%, {args.device}, "
            f"{result['threads']} threads.\n")
    (out / "search_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
