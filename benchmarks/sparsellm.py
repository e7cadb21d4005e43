"""SparseLLM vs SparseGPT on the built-in default model: WikiText-2 perplexity, pruning wall time, peak memory.

Every (method, target) runs in a fresh Python process, so its peak resident memory is its own: the process
records ``ru_maxrss`` just before and just after ``prune_model`` and reports the rise (the memory pruning needs
beyond the loaded model, calibration tokens and walk), together with the pruning wall time and the WikiText-2 test
perplexity of the result. Writes results/benchmarks/sparsellm.{json,md}.

    OMP_NUM_THREADS=1 python benchmarks/sparsellm.py [--nsamples 128] [--device cpu] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGETS = [("70%", 0.7, "unstructured"), ("2:4", None, "2:4"), ("80%", 0.8, "unstructured"),
           ("50%", 0.5, "unstructured")]
RUNS = [("sparsegpt", {}), ("sparsellm", {"iters": 4})]
EXTRA = [("70%", 0.7, "unstructured", "sparsellm", {"iters": 4, "layers": "first-half"})]  # the paper's layer set


def one(method: str, options: dict, sparsity: float | None, pattern: str, nsamples: int, device: str,
        data_dir: str | None) -> dict:
    """Prune the default model once in this process; the memory figures are this process's own."""
    import torch

    from prunesearch import data
    from prunesearch.default_model import DEFAULT_SEQLEN
    from prunesearch.evaluate import perplexity
    from prunesearch.models import load_model
    from pruners.oneshot import global_sparsity, make_pruner, prune_model
    from pruners.registry import layout
    from pruners.targets import SparsityConfig

    model, tok, source = load_model(None, device, "float32")
    calib = data.calibration_ids(tok, "c4", nsamples, DEFAULT_SEQLEN, 0, data_dir)
    targets = SparsityConfig.uniform(sparsity, pattern).resolve(layout(model))
    pruner = make_pruner(method, **options)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    result = prune_model(model, pruner, targets, calib, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"method": method, "options": options, "prune_s": seconds, "peak_rss_mib": rss_after / 1024,
           "prune_rss_rise_mib": (rss_after - rss_before) / 1024, "sparsity": global_sparsity(result["layers"]),
           "source": source, "seqlen": DEFAULT_SEQLEN, "calib": data.describe("c4", data_dir, "calibration"),
           "ppl_data": data.describe("wikitext2", data_dir, "evaluation")}
    if device.startswith("cuda"):
        row["prune_cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    details = result.get("details")
    if details:
        row["hyper"] = {k: details[k] for k in ("iters", "alpha", "beta", "gamma", "layers")}
        joint = [b for b in details["blocks"].values() if b["mode"] == "sparsellm"]
        row["ffn_error_first_last"] = [sum(b["ffn_error"][0] for b in joint), sum(b["ffn_error"][-1] for b in joint)]
        row["kept_previous"] = sum(b["kept_previous"] for b in joint)
        row["damping_retries"] = len(details["damping_retries"])
    row["ppl"] = perplexity(model, data.eval_ids(tok, "wikitext2", data_dir), DEFAULT_SEQLEN, 8)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON job for a child process
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(one(**job)))
        return
    rows = []
    jobs = [(*t, *r) for t in TARGETS for r in RUNS] + EXTRA
    for label, sparsity, pattern, method, options in jobs:
        job = {"method": method, "options": options, "sparsity": sparsity, "pattern": pattern,
               "nsamples": args.nsamples, "device": args.device, "data_dir": args.data_dir}
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1]) | {"target": label}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args)


def write(rows: list[dict], args) -> None:
    """The JSON and markdown tables of the rows measured so far."""
    first = rows[0]
    protocol = {"model": first["source"], "ppl_data": first["ppl_data"], "seqlen": first["seqlen"],
                "calib": first["calib"], "nsamples": args.nsamples, "seed": 0, "device": args.device,
                "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                "machine": platform.processor() or platform.machine()}
    result = {"protocol": protocol, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparsellm.json").write_text(json.dumps(result, indent=2))
    lines = [f"# SparseLLM vs SparseGPT on {Path(first['source']).name} ({args.device})", "",
             f"WikiText-2 test PPL (full stream, seqlen {first['seqlen']}); calibration {args.nsamples} x "
             f"{first['seqlen']} C4 tokens ({first['calib'].get('origin', '')}), seed 0, OMP_NUM_THREADS="
             f"{protocol['omp_threads']} on a shared 2-core machine (wall times compare only within this table). "
             "SparseLLM: T = 4, α = β = γ = 5, SparseGPT on attention; `first-half` optimizes blocks 0-2 only. "
             "Each row is a fresh process: peak RSS of the process, and its rise during `prune_model` "
             "(memory pruning needs beyond the loaded model and data). FFN error: Σ over optimized blocks of the "
             "mean squared FFN output error per token after iteration 1 (= SparseGPT) and after the last.", "",
             "| target | method | PPL | prune s | peak RSS MiB | RSS rise while pruning MiB | FFN error 1st → last |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" ({r['options']['layers']})" if "layers" in r["options"] else "")
        err = (f"{r['ffn_error_first_last'][0]:.4g} → {r['ffn_error_first_last'][1]:.4g}"
               if "ffn_error_first_last" in r else "-")
        lines.append(f"| {r['target']} | {name} | {r['ppl']:.3f} | {r['prune_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['prune_rss_rise_mib']:.0f} | {err} |")
    (out / "sparsellm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
