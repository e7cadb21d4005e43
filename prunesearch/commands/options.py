"""The command-line options several commands share: which model to load and how, and its calibration data."""

from __future__ import annotations

import argparse

CALIB_DEFAULTS = {"calib": "c4", "nsamples": 128, "seed": 0}


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local folder, .gguf file, hub id, or a named packaged model (smollm2-135m) of a "
                                   "causal LM (default: the built-in reference model)")
    p.add_argument("--gguf-file", help="with a hub id as --model: the GGUF file in that repository to load")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seqlen", type=int, help="tokens per sequence (default: 256 for the built-in model, "
                                              "else 2048 capped by the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--data-dir", help="offline data laid out like ../shared/data (or env PRUNESEARCH_DATA_DIR)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores "
                                               "this process may run on; split between --workers)")


def add_calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=CALIB_DEFAULTS["calib"],
                   help="calibration data: c4 | wikitext2 | ptb | PATH.txt | PATH.jsonl")
    p.add_argument("--nsamples", type=int, default=CALIB_DEFAULTS["nsamples"],
                   help=f"calibration sequences (default: {CALIB_DEFAULTS['nsamples']})")
    p.add_argument("--seed", type=int, default=CALIB_DEFAULTS["seed"],
                   help=f"seed of the calibration sampling (default: {CALIB_DEFAULTS['seed']})")
