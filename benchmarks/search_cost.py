"""What a search costs on a real model, and how few fitness tokens still rank candidates right.

On one model (default: SmolLM2-135M from its GGUF file) and one budget, measured side by side in one process:
the search's fixed costs (model load, weight ranking from calibration, dense reference), one bare forward pass over
the fitness tokens, the full measurement of a candidate (realize + KL on the same tokens) and their ratio; then,
for the heuristic seeds plus random on-budget allocations, KL to the dense model per held-out sequence, and how well
the mean over the first k sequences ranks the candidates against the mean over all of them (Kendall τ, and
whether the best candidate stays the best). This is what the fitness defaults for real models rest on.

    python benchmarks/search_cost.py [--model smollm2-135m] [--budget sparsity=0.7] [--seqlen 256] \
        [--fitness-samples 32] [--nsamples 32] [--random 10] [--data-dir ../shared/data] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from prunesearch.models import describe_model
from search.engine import SearchSettings, Workspace
from search.seeds import heuristic_seeds


class _Timings(logging.Handler):
    """Keeps the engine's log lines (it logs how long ranking took)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@torch.no_grad()
def bare_forward_s(model, ids: torch.Tensor, batch_size: int) -> float:
    """Wall time of one plain forward pass over ``ids`` (best of two)."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size], use_cache=False)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", default="sparsity=0.7")
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--fitness-samples", type=int, default=32)
    ap.add_argument("--random", type=int, default=10, help="random on-budget allocations beside the seeds")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="results/benchmarks")
    args = ap.parse_args()

    handler = _Timings()
    logging.getLogger("prunesearch").addHandler(handler)
    logging.getLogger("prunesearch").setLevel(logging.INFO)
    settings = SearchSettings(model=args.model, budget=args.budget, pruner=args.pruner, seqlen=args.seqlen,
                              nsamples=args.nsamples, fitness_samples=args.fitness_samples, data_dir=args.data_dir)
    t = time.perf_counter()
    ws = Workspace(settings, Path(tempfile.mkdtemp(prefix="search-cost-")), "cpu", args.batch_size)
    setup_s = time.perf_counter() - t
    rank_s = next((float(line.split(" in ")[1].rstrip("s")) for line in handler.lines if "ranked" in line), None)

    forward_s = bare_forward_s(ws.model, ws.heldout, args.batch_size)
    allocations = dict(heuristic_seeds(ws.space, ws.scores.outlier_ratio))
    rng = np.random.default_rng(0)
    for i in range(args.random):
        allocations[f"random-{i}"] = ws.allocation(rng.uniform(ws.space.low, ws.space.high, ws.space.dim))

    measure_s = []
    for alloc in list(allocations.values())[:3]:
        t = time.perf_counter()
        ws.measure(alloc)
        measure_s.append(time.perf_counter() - t)

    n = ws.heldout.shape[0]
    per_seq = {}
    for label, alloc in allocations.items():
        per_seq[label] = ws.measure(alloc)["fitness_rows"]
        print(f"{label:>12} KL {np.mean(per_seq[label]):.4f}", flush=True)
    kl = np.array(list(per_seq.values()))
    full = kl.mean(axis=1)
    fidelity = []
    for k in sorted({k for k in (1, 2, 4, 8, 16) if k < n} | {n}):
        part = kl[:, :k].mean(axis=1)
        fidelity.append({"sequences": k, "tokens": k * args.seqlen, "kendall_tau": float(kendalltau(part, full)[0]),
                         "same_best": bool(np.argmin(part) == np.argmin(full))})

    result = {
        "protocol": {"model": ws.source, "model_source": describe_model(ws.source), "budget": args.budget,
                     "pruner": args.pruner, "seqlen": args.seqlen, "calibration": f"{args.nsamples} x {args.seqlen}",
                     "fitness": f"{n} x {args.seqlen} held-out C4 tokens", "batch_size": args.batch_size,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine(), "candidates": len(allocations)},
        "setup_s": setup_s, "rank_s": rank_s, "forward_s": forward_s, "measure_s": measure_s,
        "measure_over_forward": float(np.median(measure_s) / forward_s), "fidelity": fidelity,
        "kl": {label: float(v) for label, v in zip(per_seq, full)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"search_cost-{Path(ws.source).stem.split('.')[0].lower()}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Search cost on {Path(ws.source).name} ({args.budget}, {args.pruner} ranks, CPU)", "",
             f"One process, {torch.get_num_threads()} torch thread(s), seqlen {args.seqlen}, calibration "
             f"{args.nsamples} sequences, fitness {n} held-out C4 sequences, batch {args.batch_size}.", "",
             "| what | seconds |", "|---|---|",
             f"| set-up (load, calibration, ranking, dense reference) | {setup_s:.1f} |",
             f"| of which weight ranking | {rank_s if rank_s is not None else float('nan'):.1f} |",
             f"| one bare forward over the {n * args.seqlen} fitness tokens | {forward_s:.2f} |",
             f"| one full candidate measurement (realize + KL), median of 3 | {np.median(measure_s):.2f} |",
             f"| measurement ÷ bare forward | {np.median(measure_s) / forward_s:.2f} |", "",
             f"Ranking {len(allocations)} candidates (5 heuristic seeds, {args.random} random on-budget allocations) "
             f"by mean KL over the first k held-out sequences against the mean over all {n}:", "",
             "| sequences | tokens | Kendall τ to all | same best |", "|---|---|---|---|"]
    lines += [f"| {f['sequences']} | {f['tokens']} | {f['kendall_tau']:.3f} | {f['same_best']} |" for f in fidelity]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
