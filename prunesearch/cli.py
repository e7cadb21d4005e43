"""The ``prunesearch`` command line: prune, eval, search, ast, predictor, export, report and realize."""

from __future__ import annotations

import argparse
import os
import sys

from pruners.methods import METHODS, names
from prunesearch import __version__
from prunesearch.commands.common import UsageError
from prunesearch.commands.evaluate import cmd_eval
from prunesearch.commands.options import add_calib_options, add_model_options
from prunesearch.commands.predictor import cmd_predictor_evaluate, cmd_predictor_retrain
from prunesearch.commands.prune import cmd_prune
from prunesearch.commands.search import cmd_search
from prunesearch.commands.train import cmd_ast
from prunesearch.results_cli import add_commands
from prunesearch.safety import UserError
from search.settings import DROP_SCAN


def _add_sparsellm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SparseLLM (--method sparsellm)")
    g.add_argument("--sparsellm-iters", type=int, help="alternating iterations T per FFN (default: 4; 1 = SparseGPT)")
    for name in ("alpha", "beta", "gamma"):
        g.add_argument(f"--sparsellm-{name}", type=float, help=f"objective weight {name} (default: 5)")
    g.add_argument("--sparsellm-layers", choices=["all", "first-half"],
                   help="blocks optimized jointly; the others get plain SparseGPT (default: all)")


def _add_width_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("width (--method width)")
    g.add_argument("--width-score", help="unit importance: flap (fluctuation, default), wanda (|W|·||X||) or taylor "
                                         "(Σ|W·∂L/∂W|, one gradient pass)")
    g.add_argument("--width-allocation", choices=["uniform", "global"],
                   help="with --width: every block keeps that share (uniform, default), or the model keeps that "
                        "share of its block parameters, the lowest FLAP-standardized units removed model-wide")
    g.add_argument("--bias-compensation", action="store_true", default=None,
                   help="add the mean contribution of removed units to the output biases (FLAP; not Qwen2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunesearch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prunesearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model one-shot to a uniform or per-layer target and save it",
                       description="Prune a model one-shot and save a folder that from_pretrained loads.")
    add_model_options(p)
    add_calib_options(p)
    p.add_argument("--method", required=True,
                   choices=[*METHODS, "width"],
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
    add_model_options(p)
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
    add_model_options(p)
    add_calib_options(p)
    p.add_argument("--space", default="sparsity", choices=["sparsity", "width", "both"],
                   help="sparsity: one sparsity per block or projection (default); width: per block the share of "
                        "key/value groups and of MLP channels kept, under params/flops/memory/latency budgets; "
                        "both: widths plus the unstructured sparsity of each block's kept weights, under a params= "
                        "budget of nonzero parameters")
    p.add_argument("--budget", default="sparsity=0.7",
                   help="sparsity=P (mean over prunable weights) or params=N (nonzero parameters, e.g. 4.5M, or a "
                        "share of the dense model such as 75%%); --space width also takes flops=, memory= and "
                        "latency= (e.g. flops=60%%, memory=300MB@2048, latency=40ms@512; @N: tokens, default "
                        "--seqlen) and several joined by commas; a range such as sparsity=0.6:0.8 searches the "
                        "Pareto front of fitness against that budget")
    p.add_argument("--latency-table", help="latency= budgets: a table measured on the serving device (the JSON a "
                                           "width run caches as cache/latency-*.json); default: measured here once")
    p.add_argument("--width-score", choices=["wanda", "flap", "taylor"],
                   help="--space width or both: importance of heads and channels (default: flap)")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (layers get k:M levels)")
    p.add_argument("--granularity", default="block", choices=["block", "projection", "block,projection"],
                   metavar="block|projection|block,projection",
                   help="one sparsity per block (default) or per projection; block,projection: coarse to fine, a "
                        "block search, then a projection search started from its answer (evo unless --sampler; "
                        "--trials per stage; OUT/block, OUT/projection)")
    p.add_argument("--pruner", default="wanda", choices=names(searchable=True),
                   help="wanda/magnitude/gblm: cached weight ranks (gblm with its default α and norm); sparsegpt: "
                        "a level database (default: wanda)")
    p.add_argument("--level-step", type=float, default=0.025,
                   help="sparsegpt only: sparsity step of the level grid on an average-size unit (default: 0.025)")
    p.add_argument("--stats-inputs", choices=["dense", "pruned", "candidate"],
                   help="where the pruner's statistics for the search's ranks or level database come from: the "
                        "dense model's inputs to every block (default for magnitude, and for wanda and gblm on the "
                        "built-in model or with --realize-top), or inputs through the earlier blocks pruned "
                        "uniformly at the budget, as the sequential pruner that realizes the result sees them "
                        "(default for sparsegpt); candidate (wanda, gblm; their default on other models): every "
                        "candidate pruned for real, sequentially, as the result will be (a calibration walk per "
                        "trial, ~1.8x the wall time of dense)")
    p.add_argument("--candidate-nsamples", type=int, metavar="N",
                   help="--stats-inputs candidate: the first N calibration sequences prune each candidate "
                        "(default: 8, at most --nsamples); the answer is pruned with all of them")
    p.add_argument("--fitness-data", default="c4", metavar="DATA",
                   help="held-out text the fitness is measured on: c4, documents kept apart from calibration and "
                        "reports (default); wikitext2 or ptb, their validation split (never their test split); or "
                        "a mix such as c4+wikitext2, whose windows alternate: the domain the allocation is chosen "
                        "for")
    p.add_argument("--enqueue", action="append", metavar="CONFIG",
                   help="a per-layer sparsity config (JSON/YAML, such as an earlier run's best_config.json) "
                        "measured first beside the heuristic seeds, fitted to this budget and granularity: a "
                        "block-level answer starts a --granularity projection search (repeatable)")
    p.add_argument("--drop-scan", default="auto", choices=DROP_SCAN,
                   help="after the seeds, measure the best seed with each run of --drop-run adjacent blocks in turn "
                        "nearly removed (at the top of its range, its weights spread over the others), then the "
                        "best few together: one trial per run plus at most 7 (default auto: single-budget sparsity "
                        "searches that do not start from an --enqueue config, when it takes at most half the "
                        "trials left)")
    p.add_argument("--drop-run", type=int, metavar="N",
                   help="blocks per drop-scan unit (default: a tenth of the depth, at least 1: single blocks up to "
                        "14 blocks, runs of 3 on 30); single drops are then combined best first, runs in pairs")
    p.add_argument("--fitness", default="kl", choices=["kl", "ppl"], help="KL to the dense model (default) or "
                                                                         "perplexity, on the --fitness-data tokens")
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
    p.add_argument("--select-top", type=int,
                   help="final selection: prune the best K allocations for real and keep the one closest to the "
                        "dense model on fresh held-out windows, an --enqueue start among them (default: 4; other "
                        "models on CPU: 6, on GPU: 8; 0 keeps the best search fitness; single budgets only)")
    p.add_argument("--select-samples", type=int, help="fresh held-out sequences of the final selection (default: 32; "
                                                       "GPU: 64), drawn after the fitness sequences")
    p.add_argument("--report-ppl", default="c4,wikitext2",
                   help="datasets reported (never searched) for the best allocation and the seeds: perplexity and KL "
                        "to the dense model; c4 is held-out text of the training distribution disjoint from the "
                        "fitness documents (default: c4,wikitext2; '' for none)")
    p.add_argument("--report-limit", type=int,
                   help="at most this many windows per report dataset (default: 256; a model other than the "
                        "built-in one on CPU: 64; 0 for all)")
    p.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--predictor", choices=["on", "off"],
                   help="prune the search space with a boosted-tree accuracy predictor (default: on, off for a "
                        "budget range and for --space width and both; width has its own features, both has "
                        "none); rounds are logged to --out/predictor_rounds.jsonl and the final predictor "
                        "saved in --out/predictor")
    p.add_argument("--predictor-init", help="warm-start from a predictor folder (`prunesearch predictor retrain`)")
    p.add_argument("--realize-top", type=int, default=0, metavar="K",
                   help="guided search: prune every allocation that enters the K best by search fitness for real "
                        "(sequentially) and re-score it on the fitness windows; local moves start from the best "
                        "realized ones and the final selection adds them (default: 0, off; about 4x a trial each; "
                        "the ranks come from dense inputs unless --stats-inputs says otherwise)")
    # calibration size and seqlen follow the model and device unless given (search.settings.EFFORT)
    p.set_defaults(func=cmd_search, nsamples=None)

    p = sub.add_parser("ast", help="train a sparse model with AST (adaptive masks, SR-STE, distillation, SLoRB)",
                       description="Adaptive Sparse Trainer: retrain an N:M or per-layer sparse model, distilled "
                                   "from its dense self, optionally 4-bit quantized; saves a from_pretrained folder.")
    add_model_options(p)
    add_calib_options(p)
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
    add_commands(sub)
    return parser


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
