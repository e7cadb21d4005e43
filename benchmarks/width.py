"""Width pruning on the built-in default model: WikiText-2 PPL of uniform vs FLAP-style widths, and CPU speedups.

At 20% and 35% of block parameters removed: uniform width (every block the same, heads in whole key/value groups)
vs FLAP's global ranking of standardized fluctuation scores, each realized by slicing; then the CPU speed of the
sliced models against dense, timed side by side in one run (torch threads = 1, batch 1): prefill of 512 tokens and
one-token decode after it (KV cache of 512 tokens), the median of several interleaved repetitions. Writes
results/benchmarks/width.{json,md}.

    python benchmarks/width.py [--model DIR] [--nsamples 128] [--reps 15] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.oneshot import add_common_options
from prunesearch import data
from prunesearch.default_model import DEFAULT_SEQLEN
from prunesearch.evaluate import perplexity, windows
from prunesearch.models import load_model
from pruners.width.allocation import global_ranking, uniform_params
from pruners.width.counting import flops_per_token, memory_bytes, shapes
from pruners.width.geometry import geometry
from pruners.width.importance import importance
from pruners.width.slicing import realize

SHARES = (0.2, 0.35)
CONTEXT = 512


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def speed(models: dict, reps: int, context: int = CONTEXT) -> dict:
    """Median prefill and one-token decode seconds per model, repetitions interleaved across models."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    times = {name: {"prefill": [], "decode": []} for name in models}
    for _ in range(reps):
        for name, model in models.items():
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            times[name]["prefill"].append(time.perf_counter() - t)
            cache = out.cache
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            model(input_ids=nxt, cache=cache, use_cache=True)
            times[name]["decode"].append(time.perf_counter() - t)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(ap)
    ap.add_argument("--reps", type=int, default=15, help="timing repetitions per model (default: 15)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dense, tok, source = load_model(args.model, "cpu", "float32")
    seqlen = DEFAULT_SEQLEN if args.model is None else min(2048, dense.config.max_position_embeddings)
    calib = data.calibration_ids(tok, "c4", args.nsamples, seqlen, 0, args.data_dir)
    test = data.eval_ids(tok, "wikitext2", args.data_dir)
    geom = geometry(dense)
    s = shapes(dense, geom)
    t = time.perf_counter()
    imp = importance(dense, calib, "flap", batch_size=args.batch_size, geom=geom)
    score_s = time.perf_counter() - t
    block_params = sum(s.block_params(w) for w in geom.widths)
    rows = [{"allocation": "dense", "removed": 0.0, "widths": geom.widths, "params": _numel(dense),
             "ppl": perplexity(dense, test, seqlen, args.batch_size)}]
    models = {"dense": dense}
    for share in SHARES:
        for name, allocate, compensate in (("uniform", lambda: uniform_params(geom, s, share), False),
                                           ("flap-global", lambda: global_ranking(geom, imp, s, share), False),
                                           ("flap-global+bias", lambda: global_ranking(geom, imp, s, share), True)):
            widths = allocate()
            model = copy.deepcopy(dense)
            realize(model, widths, imp, bias_compensation=compensate)
            label = f"{name} {share:.0%}"
            models[label] = model
            rows.append({"allocation": name, "removed": 1 - sum(s.block_params(w) for w in widths) / block_params,
                         "widths": widths, "params": _numel(model), "label": label,
                         "ppl": perplexity(model, test, seqlen, args.batch_size)})
            print(f"{label:>16}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    timing = speed(models, args.reps)
    for r in rows:
        r.update(flops_per_token=flops_per_token(s, r["widths"], CONTEXT),
                 memory=memory_bytes(s, r["widths"], CONTEXT), **timing[r.get("label", "dense")])
        r["widths"] = [[w.heads, w.kv_heads, w.intermediate] for w in r["widths"]]
    protocol = {"model": source, "ppl_data": data.describe("wikitext2", args.data_dir, "evaluation"),
                "seqlen": seqlen, "eval_tokens": windows(test, seqlen).numel(),
                "calib": data.describe("c4", args.data_dir, "calibration"), "nsamples": args.nsamples, "seed": 0,
                "score": "flap", "load_average": [round(x, 1) for x in os.getloadavg()],
                "timing": {"context": CONTEXT, "batch": 1, "threads": 1, "reps": args.reps, "statistic": "median"},
                "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "width.json").write_text(json.dumps({"protocol": protocol, "score_seconds": score_s, "rows": rows},
                                               indent=2))
    base = rows[0]
    lines = [f"# Width pruning of {Path(source).name} on CPU", "",
             f"WikiText-2 test PPL (full stream, {protocol['eval_tokens']} tokens, seqlen {seqlen}); FLAP fluctuation "
             f"scores from {args.nsamples} x {seqlen} C4 calibration tokens, seed 0 ({score_s:.1f}s); +bias: FLAP's "
             "bias compensation (zero biases added first, then the removed units' mean contribution). Removed = "
             "share of the blocks' projection parameters; params = all parameters of the saved model. "
             f"Load average (1/5/15 min) at the end of the run: {protocol['load_average']}. Speed: batch 1, torch "
             f"threads 1, median of {args.reps} interleaved repetitions in one run; prefill of {CONTEXT} tokens "
             f"and one decoded token after it. FLOPs per token at seqlen {CONTEXT} (pruners/width/counting.py); KV "
             "cache at that context, float32.", "",
             "| allocation | removed | params | PPL | prefill ms | speedup | decode ms | speedup | MFLOPs/token "
             "| KV KiB | widths (heads/kv/channels per block) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = " ".join(f"{h}/{kv}/{c}" for h, kv, c in r["widths"])
        lines.append(f"| {r['allocation']} | {r['removed']:.1%} | {r['params']:,} | {r['ppl']:.3f} | "
                     f"{1e3 * r['prefill']:.2f} | {base['prefill'] / r['prefill']:.2f}x | {1e3 * r['decode']:.2f} | "
                     f"{base['decode'] / r['decode']:.2f}x | {r['flops_per_token'] / 1e6:.2f} | "
                     f"{r['memory']['kv_cache'] / 1024:.0f} | {widths} |")
    (out / "width.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
