"""The ``prune`` command: one-shot pruning of a model to a uniform or per-layer target (or, with ``--method width``,
removing heads and channels), saved as a from_pretrained folder with its report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prunesearch.commands.common import (UsageError, check_wbits, log, perplexities, print_sparsity, print_widths,
                                         targets_config)
from prunesearch.safety import check_out


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


def cmd_prune(args) -> int:
    from prunesearch.models import check_pattern_fits, resolve_device
    from prunesearch.pruning import PruneJob, run_prune, save_folder

    out = check_out(args.out, args.overwrite)
    options = _method_options(args)
    if args.nsamples < 1:
        raise UsageError("--nsamples must be at least 1")
    if args.method == "width":
        return _prune_width(args, out)
    config = targets_config(args)
    check_wbits(args.method, args.wbits)
    check_pattern_fits(args.model, config.m)  # before the model loads
    device = resolve_device(args.device)
    job = PruneJob(config, args.method, options, args.model, device, args.dtype, args.calib,
                   args.nsamples, args.seed, args.seqlen, args.batch_size, args.data_dir)
    model, tokenizer, report = run_prune(job, log)
    if args.ppl:
        model.to(device)
        report["ppl"] = perplexities(model, tokenizer, args.ppl.split(","), report["protocol"]["seqlen"], args)
        model.to("cpu")
    save_folder(out, _model_writer(model, tokenizer), "prune_report.json", report, "prune")
    print_sparsity(report["layers"])
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
    from prunesearch.models import resolve_device
    from prunesearch.pruning import PruneJob, run_prune, save_folder

    if args.sparsity is not None or args.pattern or args.wbits is not None:
        raise UsageError("--sparsity, --pattern and --wbits do not apply to --method width")
    score = args.width_score or "flap"
    if score not in METRICS:
        raise UsageError(f"--width-score must be one of {', '.join(METRICS)}, got {score!r}")
    job = PruneJob(_width_allocator(args), "width", {"score": score, "bias_compensation": bool(args.bias_compensation)},
                   args.model, resolve_device(args.device), args.dtype, args.calib, args.nsamples, args.seed,
                   args.seqlen, args.batch_size, args.data_dir)
    model, tokenizer, report = run_prune(job, log)
    report |= {"width": args.width, "config": args.config,
               "width_allocation": args.width_allocation or ("uniform" if args.width is not None else None)}
    if args.ppl:
        model.to(job.device)
        report["ppl"] = perplexities(model, tokenizer, args.ppl.split(","), report["protocol"]["seqlen"], args)
        model.to("cpu")
    save_folder(out, _model_writer(model, tokenizer), "prune_report.json", report, "prune")
    print_widths(report, out)
    return 0
