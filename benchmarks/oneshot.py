"""One-shot pruning on the built-in default model: perplexity, pruning cost and evaluation throughput.

For each method and target: WikiText-2 test perplexity (full test stream, the reference protocol at the model's
seqlen), pruning wall time divided by one plain forward pass over the same calibration tokens, and the peak
memory while pruning (process resident set on CPU, reset before each method; allocated memory on CUDA), all
measured side by side in one run. Writes results/benchmarks/oneshot.{json,md}.

    python benchmarks/oneshot.py [--model DIR|smollm2-135m] [--device cpu|cuda] [--nsamples 128] [--methods a,b] \
        [--targets 50%,60%,70%,2:4] [--seqlen N] [--eval-windows N] [--name oneshot-smollm2] [--out results/benchmarks]

``--eval-windows N`` scores only the first N windows of the test stream (a stated fixed prefix, for CPU runs of
real models); without it the whole stream is scored.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from prunesearch import data
from prunesearch.default_model import DEFAULT_SEQLEN
from prunesearch.evaluate import perplexity, windows
from prunesearch.models import describe_model, load_model
from pruners.methods import METHODS, get_method
from pruners.oneshot import global_sparsity, make_pruner, prune_model
from pruners.registry import layout
from pruners.targets import SparsityConfig

TARGETS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("70%", 0.7, "unstructured"),
           ("80%", 0.8, "unstructured"), ("2:4", None, "2:4")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    """Start a fresh peak-memory measurement (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mib(device: str) -> float:
    """Peak memory since ``reset_peak``: allocated CUDA memory, or the process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor, batch_size: int, device: str, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one plain forward pass over ``ids``."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def claims(rows: list[dict]) -> list[str]:
    """The papers' claims (GBLM ≤ Wanda; SparseLLM ≤ SparseGPT at ≥ 70%), stated as measured here."""
    ppl = {(r["method"], r["target"]): r["ppl"] for r in rows}
    out = []
    for better, base, labels in (("wanda", "magnitude", [t[0] for t in TARGETS]),
                                 ("gblm", "wanda", [t[0] for t in TARGETS]),
                                 ("sparsellm", "sparsegpt", ["70%", "80%"])):
        pairs = [(t, ppl[better, t], ppl[base, t]) for t in labels if (better, t) in ppl and (base, t) in ppl]
        if pairs:
            held = [t for t, a, b in pairs if a <= b]
            out.append(f"- {better} <= {base} at {', '.join(labels)}: holds at {', '.join(held) or 'none'} "
                       f"(" + "; ".join(f"{t}: {a:.2f} vs {b:.2f}" for t, a, b in pairs) + ")")
    return out


def add_common_options(ap: argparse.ArgumentParser) -> None:
    """The model, device and calibration options the pruning benchmarks share."""
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="results/benchmarks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(ap)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    ap.add_argument("--targets", default=",".join(t[0] for t in TARGETS), help="comma-separated target labels")
    ap.add_argument("--seqlen", type=int, help="default: 256 for the built-in model, else 2048 capped by its context")
    ap.add_argument("--eval-windows", type=int, help="score only the first N test windows (default: all)")
    ap.add_argument("--name", help="output file stem (default: oneshot, oneshot-cuda on GPU)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    targets = [t for t in TARGETS if t[0] in args.targets.split(",")]

    model, tok, source = load_model(args.model, args.device, "float32")
    seqlen = args.seqlen or (DEFAULT_SEQLEN if args.model is None else min(2048, model.config.max_position_embeddings))
    calib = data.calibration_ids(tok, "c4", args.nsamples, seqlen, 0, args.data_dir)
    test = data.eval_ids(tok, "wikitext2", args.data_dir)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    fwd = forward_seconds(model, calib, args.batch_size, args.device)
    n_eval = windows(test, seqlen, args.eval_windows).numel()
    _sync(args.device)
    t = time.perf_counter()
    dense_ppl = perplexity(model, test, seqlen, args.batch_size, args.eval_windows)
    _sync(args.device)
    eval_tps = n_eval / (time.perf_counter() - t)
    rows = [{"method": "dense", "target": "-", "ppl": dense_ppl}]
    for label, sparsity, pattern in targets:
        for method in methods:
            model.load_state_dict(dense_state)
            targets = SparsityConfig.uniform(sparsity, pattern).resolve(layout(model))
            _sync(args.device)
            reset_peak(args.device)
            t = time.perf_counter()
            needs_calib = get_method(method).needs != "none"
            result = prune_model(model, make_pruner(method), targets, calib if needs_calib else None,
                                 device=args.device, batch_size=args.batch_size)
            _sync(args.device)
            seconds = time.perf_counter() - t
            peak = peak_mib(args.device)
            ppl = perplexity(model, test, seqlen, args.batch_size, args.eval_windows)
            rows.append({"method": method, "target": label, "ppl": ppl, "prune_s": seconds,
                         "prune_over_forward": seconds / fwd, "peak_mib": peak,
                         "sparsity": global_sparsity(result["layers"])})
            print(f"{label:>4} {method:>10} ppl {ppl:9.3f}  prune {seconds:6.2f}s = {seconds / fwd:6.2f} forwards, "
                  f"peak {peak:,.0f} MiB", flush=True)
    protocol = {"model": source, "model_source": describe_model(source),
                "ppl_data": data.describe("wikitext2", args.data_dir, "evaluation"), "seqlen": seqlen,
                "eval_tokens": n_eval, "eval_windows": args.eval_windows,
                "calib": data.describe("c4", args.data_dir, "calibration"), "nsamples": args.nsamples, "seed": 0,
                "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    result = {"protocol": protocol, "calib_forward_s": fwd, "eval_tokens_per_s": eval_tps, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("oneshot" if args.device == "cpu" else f"oneshot-{args.device.split(':')[0]}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    scored = f"first {args.eval_windows} windows" if args.eval_windows else "full stream"
    lines = [f"# One-shot pruning of {Path(source).name} on {args.device}", "",
             f"WikiText-2 test PPL ({scored}, {n_eval} tokens, seqlen {seqlen}); calibration {args.nsamples} x "
             f"{seqlen} C4 tokens ({protocol['calib'].get('origin', '')}), seed 0. Prune time is divided by one plain "
             f"forward pass over the same calibration tokens ({fwd:.3f}s), measured in the same run; peak memory "
             f"is {'allocated CUDA memory' if args.device.startswith('cuda') else 'the process resident set'} "
             f"while pruning (model included; on CPU the allocator keeps memory an earlier method freed, so later "
             f"rows are upper bounds and the rise over the first row is what a method itself adds at most). "
             f"Evaluation throughput: {eval_tps:,.0f} tokens/s.", "",
             f"Dense PPL: {dense_ppl:.3f}", "", "| target | method | PPL | prune s | prune / forward | peak MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| {r['target']} | {r['method']} | {r['ppl']:.3f} | {r['prune_s']:.2f} | "
                     f"{r['prune_over_forward']:.2f} | {r['peak_mib']:,.0f} |")
    lines += ["", "Claims checked on these numbers:"] + claims(rows)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
