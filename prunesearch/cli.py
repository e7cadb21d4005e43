"""The ``prunesearch`` command line: prune, eval, search, ast, predictor, export, report and realize."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


from prunesearch import __version__
from prunesearch.safety import UserError


class UsageError(UserError):
    """Bad input from the user: reported as one line on stderr, exit status 2, nothing written."""


def _add_model_options(p: argparse.ArgumentParser) -> None:
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


def _add_calib_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help="calibration data: c4 | wikitext2 | ptb | PATH.txt | PATH.jsonl")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: 0)")


def _add_sparsellm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SparseLLM (--method sparsellm)")
    g.add_argument("--sparsellm-iters", type=int, help="alternating iterations T per FFN (default: 4; 1 = SparseGPT)")
    for name in ("alpha", "beta", "gamma"):
        g.add_argument(f"--sparsellm-{name}", type=float, help=f"objective weight {name} (default: 5)")
    g.add_argument("--sparsellm-layers", choices=["all", "first-half"],
                   help="blocks optimized jointly; the others get plain SparseGPT (default: all)")


def _add_width_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("width (--method width)")
    g.add_argument("--width-score", help="unit importance: flap (fluctuation, default) or wanda (|W|·||X||)")
    g.add_argument("--width-allocation", choices=["uniform", "global"],
                   help="with --width: every block keeps that share (uniform, default), or the model keeps that "
                        "share of its block parameters, the lowest FLAP-standardized units removed model-wide")
    g.add_argument("--bias-compensation", action="store_true", default=None,
                   help="add the mean contribution of removed units to the output biases (FLAP; not Qwen2)")


def _method_options(args) -> dict:
    """The chosen method's own options; another method's flags are a usage error."""
    own = {"gblm": {"alpha": args.gblm_alpha, "norm": args.gblm_norm},
           "sparsellm": {k: getattr(args, f"sparsellm_{k}") for k in ("iters", "alpha", "beta", "gamma", "layers")}}
    flags = {f"--{method}-{k}": (method, v) for method, options in own.items() for k, v in options.items()}
    flags |= {f"--{k}": ("width", getattr(args, k.replace("-", "_")))
              for k in ("width", "width-score", "width-allocation", "bias-compensation")}
    for method in {m for m, _ in flags.values()}:
        given = [flag for flag, (m, v) in flags.items() if m == method and v is not None]
        if given and args.method != method:
            raise UsageError(f"{', '.join(given)} only work with --method {method}")
    return {"wbits": args.wbits} | own.get(args.method, {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunesearch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prunesearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model one-shot to a uniform or per-layer target and save it",
                       description="Prune a model one-shot and save a folder that from_pretrained loads.")
    _add_model_options(p)
    _add_calib_options(p)
    p.add_argument("--method", required=True,
                   choices=["magnitude", "wanda", "sparsegpt", "gblm", "sparsellm", "width"],
                   help="width removes attention heads and MLP channels (structured); the others zero weights")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="uniform sparsity in [0, 1)")
    target.add_argument("--width", type=float, help="width only: share of heads and MLP channels kept, in (0, 1]")
    target.add_argument("--config", help="per-layer JSON config (schema in the README; a width section for width)")
    p.add_argument("--pattern", help="unstructured | N:M such as 2:4 or 4:8 (default: unstructured)")
    p.add_argument("--wbits", type=int, help="SparseGPT only: also quantize the kept weights to this many bits")
    p.add_argument("--gblm-alpha", type=float, help="GBLM only: weight α of the gradient term |W|·G (default: 1, "
                                                    "the reference's sum with gradients scaled by 100)")
    p.add_argument("--gblm-norm", choices=["l2", "l1"], help="GBLM only: norm of the gradients over calibration "
                                                             "sequences (default: l2)")
    p.add_argument("--ppl", help="after pruning, report perplexity on these comma-separated datasets")
    _add_sparsellm_options(p)
    _add_width_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity, KL to a dense model and zero-shot tasks",
                       description="Evaluate a (pruned) model.")
    _add_model_options(p)
    p.add_argument("--ppl", default="wikitext2", help="comma-separated datasets: wikitext2, ptb, c4, PATH "
                                                      "(default: wikitext2; '' for none)")
    p.add_argument("--kl-ref", help="dense reference model (folder, hub id or 'default') for KL on held-out tokens")
    p.add_argument("--kl-samples", type=int, default=64, help="held-out sequences for the KL (default: 64)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (offline with --data-dir: piqa, arc_easy, "
                                   "arc_challenge, winogrande, boolq, lambada_openai, hellaswag)")
    p.add_argument("--limit", type=int, help="at most this many windows per PPL dataset / examples per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out KL sampling (default: 0)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="search the per-layer allocation with the best accuracy inside a budget",
                       description="Budget-constrained per-layer sparsity search (an Optuna study in --out).")
    _add_model_options(p)
    _add_calib_options(p)
    p.add_argument("--budget", default="sparsity=0.7",
                   help="sparsity=P (mean over prunable weights) or params=N (nonzero parameters, e.g. 4.5M); a "
                        "range such as sparsity=0.6:0.8 searches the Pareto front of fitness against sparsity")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (layers get k:M levels)")
    p.add_argument("--granularity", default="block", choices=["block", "projection"])
    p.add_argument("--pruner", default="wanda", choices=["wanda", "magnitude", "gblm", "sparsegpt"],
                   help="wanda/magnitude/gblm: cached weight ranks (gblm with its default α and norm); sparsegpt: "
                        "a level database (default: wanda)")
    p.add_argument("--level-step", type=float, default=0.025,
                   help="sparsegpt only: sparsity step of the level grid on an average-size unit (default: 0.025)")
    p.add_argument("--fitness", default="kl", choices=["kl", "ppl"], help="KL to the dense model (default) or "
                                                                         "perplexity, on held-out C4 tokens")
    p.add_argument("--min-sparsity", type=float, help="lower bound per unit (default: budget - 0.35)")
    p.add_argument("--max-sparsity", type=float, help="upper bound per unit (default: budget + 0.35, at most 0.99)")
    p.add_argument("--trials", type=int, help="stop after this many measured trials (default: 100)")
    p.add_argument("--time-budget", help="stop after this long: 90s, 30m, 2h")
    p.add_argument("--sampler", choices=["tpe", "qmc", "nsga2", "evo"],
                   help="default: tpe, or nsga2 for a budget range")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on one study")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default: a journal in --out)")
    p.add_argument("--study", default="prunesearch", help="study name in the storage")
    p.add_argument("--cache-dir", help="folder for the expensive caches (ranks, level database, dense reference), "
                                       "shared by workers of one study (default: --out/cache)")
    p.add_argument("--heartbeat", type=int, default=30, help="database storage: seconds between a trial's "
                                                             "heartbeats; a trial silent for 2x that is failed and "
                                                             "retried (default: 30)")
    p.add_argument("--fitness-samples", type=int, help="held-out sequences per full evaluation (default: 32; a "
                                                         "model other than the built-in one on CPU: 16 of 256 tokens)")
    p.add_argument("--low-fidelity-samples", type=int, help="sequences of the first, cheap rung (default: 8; other "
                                                             "models on CPU: 4)")
    p.add_argument("--report-ppl", default="c4,wikitext2",
                   help="datasets reported (never searched) for the best allocation and the seeds: perplexity and KL "
                        "to the dense model; c4 is held-out text of the training distribution disjoint from the "
                        "fitness documents (default: c4,wikitext2; '' for none)")
    p.add_argument("--report-limit", type=int, default=256,
                   help="at most this many windows per report dataset (default: 256; 0 for all)")
    p.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--predictor", choices=["on", "off"],
                   help="prune the search space with a boosted-tree accuracy predictor (default: on, off for a "
                        "budget range); rounds are logged to --out/predictor_rounds.jsonl and the final predictor "
                        "saved in --out/predictor")
    p.add_argument("--predictor-init", help="warm-start from a predictor folder (`prunesearch predictor retrain`)")
    # calibration size and seqlen follow the model and device unless given (search.settings.EFFORT)
    p.set_defaults(func=cmd_search, nsamples=None)

    p = sub.add_parser("ast", help="train a sparse model with AST (adaptive masks, SR-STE, distillation, SLoRB)",
                       description="Adaptive Sparse Trainer: retrain an N:M or per-layer sparse model, distilled "
                                   "from its dense self, optionally 4-bit quantized; saves a from_pretrained folder.")
    _add_model_options(p)
    _add_calib_options(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="uniform unstructured sparsity in [0, 1)")
    target.add_argument("--config", help="per-layer JSON config (prune --config / search best_config.json)")
    p.add_argument("--pattern", help="N:M such as 2:4 (default) or 4:8, or unstructured")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    p.add_argument("--min-lr", type=float, help="final cosine learning rate (default: lr/10)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (default: 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 for none (default: 1.0)")
    p.add_argument("--kd", default="0.33,0.67", help="a_task,a_kl loss weights (default: 0.33,0.67; 1,0 = no KD)")
    p.add_argument("--kd-hidden", type=float, default=0.0, help="weight of the hidden-state term (default: 0)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (default: 2)")
    p.add_argument("--mask-every", type=int, default=10, help="recompute masks every K steps, 0 = fixed (default: 10)")
    p.add_argument("--mask-metric", default="magnitude", choices=["magnitude", "wanda"])
    p.add_argument("--srste-lambda", type=float, default=1e-4, help="final SR-STE decay λ (default: 1e-4)")
    p.add_argument("--srste-ramp", type=float, default=0.25, help="fraction of training over which λ rises")
    p.add_argument("--slorb-k", type=int, default=0, help="SLoRB group size k, 0 for none (paper: 16)")
    p.add_argument("--slorb-trainable-projection", action="store_true", help="also train SLoRB's projection P")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--wbits", type=int, help="quantize the trained weights to this many bits (keeps the pattern)")
    p.add_argument("--quant", default="gptq", choices=["gptq", "rtn"], help="quantizer for --wbits (default: gptq)")
    p.add_argument("--group-size", type=int, default=128, help="rtn: input columns per scale (default: 128)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: 100)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint with the same options")
    p.add_argument("--ppl", help="after training, report perplexity on these comma-separated datasets")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ast)

    p = sub.add_parser("predictor", help="retrain or evaluate the accuracy predictor on measured search pairs",
                       description="Train the fitness predictor on the pairs of finished runs, or score one.")
    psub = p.add_subparsers(dest="predictor_command", required=True)
    r = psub.add_parser("retrain", help="train on the completed trials of runs (and extra pairs); print metrics")
    r.add_argument("--from", dest="runs", action="append", default=[], metavar="RUN", help="search run folder "
                                                                                          "(repeatable)")
    r.add_argument("--pairs", action="append", default=[], help="extra pairs: a features parquet as written by "
                                                                "--export-pairs (repeatable)")
    r.add_argument("--out", required=True, help="predictor folder to write")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r.add_argument("--allow-mixed", action="store_true", help="pool pairs of different models or budget kinds")
    r.add_argument("--target", default="log", choices=["log", "rank"], help="learned target (default: log)")
    r.add_argument("--objective", default="regression", choices=["regression", "pairwise"])
    r.add_argument("--members", type=int, default=8, help="bootstrap ensemble members (default: 8)")
    r.add_argument("--folds", type=int, default=5, help="K of the K-fold metrics (default: 5)")
    r.add_argument("--depth-bins", type=int, default=8, help="relative-depth bins of the features (default: 8)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--compare", action="store_true", help="also cross-validate the other targets/objectives")
    r.add_argument("--export-pairs", help="also write the pooled feature pairs to this parquet file")
    r.set_defaults(func=cmd_predictor_retrain)
    e = psub.add_parser("evaluate", help="score a saved predictor on the completed trials of a run")
    e.add_argument("--predictor", required=True, help="predictor folder")
    e.add_argument("--on", required=True, help="search run folder")
    e.add_argument("--allow-mixed", action="store_true", help="score on a run of another model or budget kind")
    e.set_defaults(func=cmd_predictor_evaluate)
    from prunesearch.results_cli import add_commands

    add_commands(sub)
    return parser


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_out(out: str, overwrite: bool) -> Path:
    """A new --out, or with --overwrite a folder prunesearch wrote (``prunesearch.safety.check_out``)."""
    from prunesearch.safety import check_out

    return check_out(out, overwrite)


def _targets_config(args):
    from pruners.targets import SparsityConfig

    if args.config:
        config = SparsityConfig.load(args.config)
        if args.pattern and args.pattern != config.pattern:
            raise UsageError(f"--pattern {args.pattern} contradicts the config's pattern {config.pattern}")
        return config
    if args.sparsity is None and not (args.pattern and ":" in args.pattern):
        raise UsageError("give --sparsity P, --config FILE, or an N:M --pattern")
    return SparsityConfig.uniform(args.sparsity, args.pattern or "unstructured")


def _seqlen(model, args) -> int:
    from prunesearch.models import default_seqlen

    return default_seqlen(model, args.seqlen, builtin=args.model is None)


def _perplexities(model, tokenizer, names: list[str], seqlen: int, args) -> dict:
    from prunesearch import data
    from prunesearch.evaluate import perplexity

    out = {}
    for name in names:
        ids = data.eval_ids(tokenizer, name, args.data_dir)
        limit = args.limit if getattr(args, "limit", None) else (256 if name == "c4" else None)
        out[name] = {"ppl": perplexity(model, ids, seqlen, args.batch_size, limit),
                     "seqlen": seqlen, "windows": min(ids.numel() // seqlen, limit or ids.numel()),
                     "source": data.describe(name, args.data_dir)}
        _log(f"ppl {name}: {out[name]['ppl']:.3f}")
    return out


def cmd_prune(args) -> int:
    from prunesearch.models import check_pattern_fits, resolve_device
    from prunesearch.pruning import PruneJob, run_prune, save_folder

    out = _check_out(args.out, args.overwrite)
    options = _method_options(args)
    if args.nsamples < 1:
        raise UsageError("--nsamples must be at least 1")
    if args.method == "width":
        return _prune_width(args, out)
    config = _targets_config(args)
    if args.wbits is not None and (args.method != "sparsegpt" or not 2 <= args.wbits <= 8):
        raise UsageError("--wbits takes 2..8 and only works with --method sparsegpt")
    check_pattern_fits(args.model, config.m)  # before the model loads
    device = resolve_device(args.device)
    job = PruneJob(config, args.method, options, args.model, device, args.dtype, args.calib,
                   args.nsamples, args.seed, args.seqlen, args.batch_size, args.data_dir)
    model, tokenizer, report = run_prune(job, _log)
    if args.ppl:
        model.to(device)
        report["ppl"] = _perplexities(model, tokenizer, args.ppl.split(","), report["protocol"]["seqlen"], args)
        model.to("cpu")
    save_folder(out, _model_writer(model, tokenizer), "prune_report.json", report, "prune")
    _print_sparsity(report["layers"])
    print(f"global sparsity {report['global_sparsity']:.4f}; saved to {out}")
    return 0


def _model_writer(model, tokenizer) -> Callable[[Path], None]:
    """What ``save_folder`` writes for a pruned model: its weights and its tokenizer."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return write


def _width_allocator(args):
    """How ``prune --method width`` picks per-layer widths: --width (uniform or global) or the config's section."""
    from pruners.width.allocation import from_config, global_ranking, uniform

    if args.config:
        try:
            section = json.loads(Path(args.config).read_text()).get("width")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise UsageError(f"--config {args.config}: cannot read a JSON object ({e})") from None
        if not isinstance(section, dict) or not section:
            raise UsageError(f"--config {args.config} has no width section (schema in the README)")
        if args.width_allocation:
            raise UsageError("--width-allocation goes with --width, not --config")
        return lambda geom, imp, s: from_config(geom, section)
    if args.width is None or not 0 < args.width <= 1:
        raise UsageError("--method width needs --width in (0, 1] (share kept) or --config with a width section")
    if args.width_allocation == "global":
        return lambda geom, imp, s: global_ranking(geom, imp, s, 1 - args.width)
    return lambda geom, imp, s: uniform(geom, args.width)


def _prune_width(args, out: Path) -> int:
    from pruners.width.importance import METRICS
    from pruners.width.prune import prune_width
    from prunesearch import data
    from prunesearch.models import describe_model, load_model, resolve_device
    from prunesearch.pruning import save_folder

    if args.sparsity is not None or args.pattern or args.wbits is not None:
        raise UsageError("--sparsity, --pattern and --wbits do not apply to --method width")
    score = args.width_score or "flap"
    if score not in METRICS:
        raise UsageError(f"--width-score must be one of {', '.join(METRICS)}, got {score!r}")
    allocate = _width_allocator(args)
    device = resolve_device(args.device)
    timings = {}
    t = time.perf_counter()
    model, tokenizer, source = load_model(args.model, "cpu", args.dtype, compute_device=device)
    timings["load"] = time.perf_counter() - t
    seqlen = _seqlen(model, args)
    t = time.perf_counter()
    calib = data.calibration_ids(tokenizer, args.calib, args.nsamples, seqlen, args.seed, args.data_dir)
    timings["calibration_data"] = time.perf_counter() - t
    _log(f"width-pruning {source} ({score} scores) on {device}")
    result = prune_width(model, calib, allocate, score, bool(args.bias_compensation), device, args.batch_size)
    timings["prune"] = result.pop("prune_seconds")
    report = {"method": "width", "model": source, "width": args.width, "width_allocation": args.width_allocation
              or ("uniform" if args.width is not None else None), "config": args.config, **result,
              "protocol": {"model": describe_model(source), "calib": data.describe(args.calib, args.data_dir),
                           "nsamples": args.nsamples,
                           "seqlen": seqlen, "seed": args.seed, "device": device,
                           "dtype": str(next(model.parameters()).dtype)},
              "timings_s": timings}
    if args.ppl:
        model.to(device)
        report["ppl"] = _perplexities(model, tokenizer, args.ppl.split(","), seqlen, args)
        model.to("cpu")
    save_folder(out, _model_writer(model, tokenizer), "prune_report.json", report, "prune")
    print(f"{'block':>5} {'heads':>9} {'kv':>7} {'channels':>13}")
    for row in result["layers"]:
        dense = row["dense"]
        print(f"{row['block']:>5} {row['heads']:>4}/{dense['heads']:<4} {row['kv_heads']:>3}/{dense['kv_heads']:<3} "
              f"{row['intermediate']:>6}/{dense['intermediate']:<6}")
    before, after = result["before"], result["after"]
    print(f"parameters {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.1%}; block "
          f"projections {after['block_params'] / before['block_params']:.1%}); saved to {out}")
    return 0


def _print_sparsity(rows: list[dict]) -> None:
    blocks: dict[int, list[dict]] = {}
    for r in rows:
        blocks.setdefault(r["block"], []).append(r)
    print(f"{'block':>5} {'target':>8} {'actual':>8}")
    for b, rs in blocks.items():
        n = sum(r["shape"][0] * r["shape"][1] for r in rs)
        actual = sum(r["actual_sparsity"] * r["shape"][0] * r["shape"][1] for r in rs) / n
        target = sum((r["target_sparsity"] or 0) * r["shape"][0] * r["shape"][1] for r in rs) / n
        print(f"{b:>5} {target:>8.4f} {actual:>8.4f}")


def cmd_eval(args) -> int:
    from prunesearch.models import describe_model, load_model, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, source = load_model(args.model, device, args.dtype)
    seqlen = _seqlen(model, args)
    results: dict = {"model": source, "model_protocol": describe_model(source), "seqlen": seqlen}
    names = [n for n in (args.ppl or "").split(",") if n]
    if names:
        results["ppl"] = _perplexities(model, tokenizer, names, seqlen, args)
    if args.kl_ref:
        results["kl"] = _kl(model, tokenizer, seqlen, device, args)
    if args.tasks:
        from prunesearch.zeroshot import evaluate_tasks

        results["tasks"] = evaluate_tasks(model, tokenizer, args.tasks.split(","), args.data_dir, args.limit,
                                          args.batch_size, device)
    text = json.dumps(results, indent=2)
    if args.json:
        from prunesearch.files import atomic_write

        atomic_write(args.json, text)
    print(text)
    return 0


def _kl(model, tokenizer, seqlen: int, device: str, args) -> dict:
    from prunesearch import data
    from prunesearch.cache import cache_dir
    from prunesearch.evaluate import DenseReference, reference_key
    from prunesearch.models import load_model, model_source

    ids = data.heldout_ids(tokenizer, args.kl_samples, seqlen, args.seed, args.data_dir)
    ref_source = model_source(None if args.kl_ref == "default" else args.kl_ref)
    path = cache_dir("references") / f"{reference_key(ref_source, ids, None)}.safetensors"
    ref = DenseReference.cached(path, lambda: load_model(ref_source, device, args.dtype)[0], ids, args.batch_size)
    kl = ref.kl(model, args.batch_size)
    _log(f"KL to {ref_source}: {kl:.5f}")
    return {"kl": kl, "reference": ref_source, "tokens": int(ids.numel()), "seqlen": seqlen,
            "heldout": data.describe("c4", args.data_dir), "seed": args.seed}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h`` or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UsageError(f"--time-budget must look like 90s, 30m or 2h, got {text!r}") from None
    if value <= 0:
        raise UsageError("--time-budget must be positive")
    return value


def cmd_search(args) -> int:
    from prunesearch.models import resolve_device
    from search.settings import SearchSettings, default_effort
    from search.study import run_search
    from search.preflight import check_search_args

    check_search_args(args)  # storage, budget, pattern, out, numbers: before the model loads
    multi = ":" in args.budget
    device = resolve_device(args.device)
    given = {"seqlen": args.seqlen, "nsamples": args.nsamples, "fitness_samples": args.fitness_samples,
             "low_fidelity_samples": args.low_fidelity_samples}
    effort = default_effort(args.model is None, device) | {k: v for k, v in given.items() if v is not None}
    settings = SearchSettings(
        model=args.model, budget=args.budget, pattern=args.pattern, granularity=args.granularity,
        pruner=args.pruner, fitness=args.fitness, sampler=args.sampler or ("nsga2" if multi else "tpe"),
        min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity, calib=args.calib, seed=args.seed,
        data_dir=args.data_dir, level_step=args.level_step, **effort,
    )
    time_budget = parse_duration(args.time_budget) if args.time_budget else None
    out = Path(args.out)
    guide = None
    if (args.predictor or ("off" if multi else "on")) == "on":
        from search.guided import Guide, GuideConfig

        guide = Guide(GuideConfig(init=args.predictor_init))
    elif args.predictor_init:
        raise UsageError("--predictor-init needs --predictor on")
    summary = run_search(settings, out, args.trials, time_budget, args.workers, args.storage, args.study,
                         device, args.batch_size, tuple(d for d in args.report_ppl.split(",") if d),
                         args.report_limit or None, not args.quiet, guide, args.cache_dir and Path(args.cache_dir),
                         args.heartbeat)
    if summary.get("stopped"):
        print(f"prunesearch: {summary['stopped']}; the trials so far are kept in {out}", file=sys.stderr)
        return 1
    _print_summary(summary, out)
    return 130 if summary.get("interrupted") else 0


def cmd_ast(args) -> int:
    from dataclasses import asdict

    from pruners.ast_export import finalize, save_ast_model
    from pruners.ast_trainer import ASTSettings, ASTTrainer
    from pruners.quantize import quantize_model, size_report
    from pruners.registry import layout
    from prunesearch import data
    from prunesearch.models import check_pattern_fits, describe_model, load_model, resolve_device

    out = Path(args.out)
    if args.resume:
        if not (out / "checkpoint" / "state.json").is_file():
            raise UsageError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    else:
        _check_out(args.out, args.overwrite)
    if not args.config and args.sparsity is None and not args.pattern:
        args.pattern = "2:4"
    config = _targets_config(args)
    try:
        a_task, a_kl = (float(x) for x in args.kd.split(","))
    except ValueError:
        raise UsageError(f"--kd must be two numbers a_task,a_kl such as 0.33,0.67, got {args.kd!r}") from None
    if args.wbits is not None and not 2 <= args.wbits <= 8:
        raise UsageError("--wbits takes 2..8")
    if args.dtype not in ("auto", "float32"):
        raise UsageError("ast trains float32 master weights (bf16 autocast on GPU); --dtype must be auto or float32")
    if args.save_every < 0 or args.group_size < 0 or args.nsamples < 1:
        raise UsageError("--save-every and --group-size must be >= 0, --nsamples >= 1")
    check_pattern_fits(args.model, config.m)  # before the model loads
    settings = ASTSettings(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, a_task=a_task, a_kl=a_kl,
        a_hidden=args.kd_hidden, temperature=args.temperature, mask_every=args.mask_every,
        mask_metric=args.mask_metric, srste_lambda=args.srste_lambda, srste_ramp=args.srste_ramp,
        slorb_k=args.slorb_k, slorb_trainable_projection=args.slorb_trainable_projection,
        gradient_checkpointing=args.gradient_checkpointing, wanda_samples=args.nsamples)
    device = resolve_device(args.device)
    model, tokenizer, source = load_model(args.model, "cpu", "float32")
    targets = config.resolve(layout(model))
    seqlen = _seqlen(model, args)
    train_ids = data.calibration_ids(tokenizer, args.calib, settings.windows, seqlen, args.seed, args.data_dir)
    trainer = ASTTrainer(model, targets, settings, train_ids, device)
    if args.resume:
        trainer.load_checkpoint(out / "checkpoint")
        _log(f"resuming at step {trainer.step} of {settings.steps}")
    elif out.exists():
        from prunesearch.safety import remove_output

        remove_output(out)
    out.mkdir(parents=True, exist_ok=True)
    from prunesearch.safety import mark_output

    mark_output(out, "ast")
    _log(f"AST on {source}: {len(trainer.layers)} sparse layers, {settings.windows} C4-train-side windows of "
         f"{seqlen} tokens, device {device}")
    t = time.perf_counter()
    history = trainer.train(out / "checkpoint", args.save_every, not args.quiet)
    train_s = time.perf_counter() - t
    slorb_params = trainer.slorb_parameters()
    slorbs = finalize(model, trainer.layers)
    trainer.teacher = None
    report = {
        "model": source, "config": config.to_dict(), "settings": asdict(settings),
        "protocol": {"model": describe_model(source), "train": data.describe(args.calib, args.data_dir),
                     "seqlen": seqlen, "seed": args.seed,
                     "windows": settings.windows, "tokens": settings.windows * seqlen, "device": device},
        "train_seconds_this_run": train_s, "slorb_parameters": slorb_params,
        "slorb_fraction_of_projections": slorb_params / sum(layout(model).numel(n) for n in targets),
    }
    if args.wbits:
        calib = train_ids[:args.nsamples] if args.quant == "gptq" else None
        quantize_model(model, targets, args.quant, args.wbits, args.group_size, calib, device, args.batch_size)
    report["size"] = size_report(model, targets, args.wbits, args.group_size if args.quant == "rtn" else 0,
                                 slorb_params)
    report["quantization"] = {"wbits": args.wbits, "method": args.quant} if args.wbits else None
    if args.ppl:
        report["ppl"] = _perplexities(model.to(device), tokenizer, args.ppl.split(","), seqlen, args)
    report["history"] = history
    save_ast_model(model.to("cpu"), tokenizer, slorbs, out)
    from prunesearch.files import atomic_json

    atomic_json(out / "ast_report.json", report)
    last = history[-1] if history else {}
    print(f"AST done: {trainer.step} steps, last loss {last.get('loss', float('nan')):.4f}; SLoRB parameters "
          f"{slorb_params}; size vs fp32 {report['size']['model_ratio_vs_fp32']:.2f}x; saved to {out}")
    return 0


def _report_columns(summary: dict) -> tuple[list[str], Callable[[str], str]]:
    """Header cells and a row formatter for the report data (KL to dense and PPL per dataset) of a summary."""
    ppl, kl = summary.get("report_ppl", {}), summary.get("report_kl", {})
    datasets = list(next(iter(ppl.values()), {}))
    header = [f"{d + ' ' + m:>16}" for d in datasets for m in ("kl", "ppl")]

    def cells(label: str) -> str:
        if label not in ppl:
            return " ".join(f"{'':>16}" for _ in header)
        return " ".join(f"{kl[label][d]:>16.5f} {ppl[label][d]:>16.3f}" for d in datasets)

    return header, cells


def _print_summary(summary: dict, out: Path) -> None:
    if summary.get("best", 0) is None:
        print(f"no trial completed; everything so far is kept in {out}")
        return
    if "front" in summary:
        _print_front(summary, out)
        return
    kind = summary["fitness_kind"]
    header, cells = _report_columns(summary)
    print(f"\n{'allocation':<14} {kind + ' (search data)':>20} " + " ".join(header))
    rows = [("best", summary["best"]["fitness"])] + [(k, v["fitness"]) for k, v in summary["seeds"].items()]
    for label, fit in rows:
        print(f"{label:<14} {fit:>20.5f} " + cells(label))
    alloc = ", ".join(f"{k}: {v:.3f}" for k, v in summary["best"]["allocation"].items())
    print(f"best ({summary['best']['label']}, trial {summary['best']['trial']}): {alloc}")
    print(f"{summary['trials']} trials ({summary['pruned']} stopped early at low fidelity), "
          f"median trial {summary['median_trial_s']:.2f}s; results in {out}")


def _print_front(summary: dict, out: Path) -> None:
    kind = summary["fitness_kind"]
    print(f"\nPareto front ({len(summary['front'])} allocations; configs in {out / 'pareto'}):")
    print(f"{'sparsity':>9} {kind:>10} {'trial':>6}  label")
    for row in summary["front"]:
        print(f"{row['sparsity']:>9.4f} {row['fitness']:>10.5f} {row['trial']:>6}  {row['label']}")
    print("\nEach seed against the best front allocation at least as sparse (front@budget):")
    header, cells = _report_columns(summary)
    print(f"{'allocation':<16} {'sparsity':>9} {kind + ' (search data)':>20} " + " ".join(header))
    for label, v in summary["seeds"].items():
        budget = label.partition("@")[2]
        front = v["front"]
        if label.startswith("uniform@") and front is not None:
            print(f"{'front@' + budget:<16} {front['sparsity']:>9.4f} {front['fitness']:>20.5f} "
                  + cells(f"front@{budget}"))
        print(f"{label:<16} {v['sparsity']:>9.4f} {v['fitness']:>20.5f} " + cells(label))
    print(f"{summary['trials']} trials, median trial {summary['median_trial_s']:.2f}s; results in {out}")


def _print_metrics(rows: dict[str, dict]) -> None:
    print(f"{'predictor':<22} {'pairs':>6} {'kendall_tau':>12} {'spearman':>9} {'rmse':>11} {'top10_prec':>10}")
    for name, m in rows.items():
        print(f"{name:<22} {m['n']:>6} {m['kendall_tau']:>12.4f} {m['spearman']:>9.4f} {m['rmse']:>11.4g} "
              f"{m['top10_precision']:>10.3f}")


def cmd_predictor_retrain(args) -> int:
    from predictors.features import make_spec
    from predictors.metrics import cross_validate
    from predictors.model import FitnessPredictor, data_hash
    from predictors.pairs import combine, file_pairs, run_pairs

    out = _check_out(args.out, args.overwrite)
    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    if args.members < 1:
        raise UsageError("--members must be at least 1")
    spec = make_spec(args.depth_bins)
    pairs = combine([run_pairs(Path(r), spec) for r in args.runs] + [file_pairs(Path(p), spec) for p in args.pairs],
                    args.allow_mixed)
    model = FitnessPredictor(n_members=args.members, target=args.target, objective=args.objective,
                             random_state=args.seed)
    variants = {f"{args.target}/{args.objective}": model}
    if args.compare:
        for target, objective in (("log", "regression"), ("rank", "regression"), ("log", "pairwise")):
            variants.setdefault(f"{target}/{objective}", FitnessPredictor(
                n_members=args.members, target=target, objective=objective, random_state=args.seed))
    rows = {f"{name} ({args.folds}-fold)": cross_validate(m, pairs.X, pairs.y, args.folds, args.seed)[0]
            for name, m in variants.items()}
    metrics = next(iter(rows.values()))
    model.fit(pairs.X, pairs.y)
    training = {"runs": [str(r) for r in args.runs], "pairs_files": [str(p) for p in args.pairs],
                "pairs": len(pairs), "hash": data_hash(pairs.X, pairs.y), "models": sorted(set(pairs.model)),
                "budgets": sorted(set(pairs.budget)), "fitness_kind": pairs.fitness_kind[0]}
    from prunesearch.files import atomic_path
    from prunesearch.safety import output_folder

    with output_folder(out, "predictor") as tmp:
        model.save(tmp, spec, training, metrics)
    if args.export_pairs:
        with atomic_path(args.export_pairs) as tmp:
            pairs.to_frame(spec).to_parquet(tmp, index=False)
    _print_metrics(rows)
    print(f"trained on {len(pairs)} pairs from {len(args.runs)} run(s) and {len(args.pairs)} pairs file(s); "
          f"saved to {out}")
    return 0


def cmd_predictor_evaluate(args) -> int:
    from predictors.features import check_spec, make_spec
    from predictors.metrics import ranking_metrics
    from predictors.model import FitnessPredictor
    from predictors.pairs import check_compatible, run_pairs

    model, meta = FitnessPredictor.load(Path(args.predictor))
    spec = meta["feature_spec"]
    check_spec(make_spec(spec.get("depth_bins", 0)), spec)
    pairs = run_pairs(Path(args.on), spec)
    training = meta.get("training", {})
    if training.get("fitness_kind") and training["fitness_kind"] != pairs.fitness_kind[0]:
        raise UsageError(f"the predictor learned {training['fitness_kind']} fitness, {args.on} measures "
                         f"{pairs.fitness_kind[0]}")
    models = training.get("models") or [training.get("model")]
    budgets = training.get("budgets") or [training.get("budget")]
    if len(models) == 1 and len(budgets) == 1 and models[0] and budgets[0]:
        check_compatible(pairs, args.allow_mixed, {"model": models[0], "budget": budgets[0]})
    metrics = ranking_metrics(pairs.y, model.predict(pairs.X))
    _print_metrics({"held-out run": metrics})
    if str(Path(args.on)) in {str(Path(r)) for r in training.get("runs", [])}:
        print(f"note: {args.on} was part of this predictor's training data; these are not held-out numbers")
    return 0


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: as asked; else OMP_NUM_THREADS; else the cores this process may use (a container's
    CPU set, not the host's core count, which oversubscribes and slows every forward pass)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        if getattr(args, "gguf_file", None):
            if not args.model or not args.gguf_file.endswith(".gguf"):
                raise UsageError("--gguf-file NAME.gguf needs --model OWNER/REPO (the hub repository holding it)")
            args.model = f"{args.model}/{args.gguf_file}"
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except UserError as e:  # bad input or a refused action; any other exception is a bug and keeps its traceback
        if os.environ.get("PRUNESEARCH_DEBUG"):
            raise
        print(f"prunesearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunesearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
