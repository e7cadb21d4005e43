"""Cost of GBLM's gradient pass on the built-in default model, against one plain forward pass measured beside it.

The pass runs forward and backward one calibration sequence at a time (per-sequence gradients are what the norm
is taken over), so it is compared with one batched forward pass over the same tokens. Also checks that a second
request is served from the safetensors cache. Writes results/benchmarks/gblm_gradient.{json,md}.

    python -m benchmarks.gblm_gradient [--model DIR] [--device cpu|cuda] [--nsamples 128] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.oneshot import add_common_options, forward_seconds
from prunesearch import data
from prunesearch.default_model import DEFAULT_SEQLEN
from prunesearch.models import load_model
from pruners.gblm import cached_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(ap)
    args = ap.parse_args()

    model, tok, source = load_model(args.model, args.device, "float32")
    seqlen = DEFAULT_SEQLEN if args.model is None else min(2048, model.config.max_position_embeddings)
    calib = data.calibration_ids(tok, "c4", args.nsamples, seqlen, 0, args.data_dir)
    fwd = forward_seconds(model, calib, args.batch_size, args.device)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PRUNESEARCH_CACHE"] = cache
        _, _, grad_s = cached_gradients(model, calib, "l2", 100.0, args.device)  # a miss: the pass, timed inside
        t = time.perf_counter()
        _, _, again = cached_gradients(model, calib, "l2", 100.0, args.device)
        hit_s = time.perf_counter() - t
    fwd_after = forward_seconds(model, calib, args.batch_size, args.device)
    forward = min(fwd, fwd_after)
    protocol = {"model": source, "calib": data.describe("c4", args.data_dir, "calibration"),
                "nsamples": args.nsamples, "seqlen": seqlen, "seed": 0, "device": args.device,
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    result = {"protocol": protocol, "forward_s": forward, "gradient_pass_s": grad_s,
              "gradient_over_forward": grad_s / forward,
              "cache_hit_s": hit_s, "cache_hit_ran_a_pass": again is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gblm_gradient.json").write_text(json.dumps(result, indent=2))
    lines = [f"# GBLM gradient pass on {Path(source).name} ({args.device}, {torch.get_num_threads()} threads)", "",
             f"{args.nsamples} x {seqlen} C4 calibration tokens ({protocol['calib'].get('origin', '')}), seed 0, "
             "l2 norm, scale 100; one forward+backward per sequence.", "",
             "| measured side by side | seconds | ÷ forward |", "|---|---|---|",
             f"| plain forward pass over the calibration tokens (batch {args.batch_size}, best of 3, before/after) "
             f"| {forward:.2f} | 1.00 |",
             f"| gradient pass | {grad_s:.2f} | {grad_s / forward:.2f} |",
             f"| cache hit (hash weights and ids, load the file) | {hit_s:.2f} | {hit_s / forward:.2f} |"]
    (out / "gblm_gradient.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
