"""The ``ast`` command: train a sparse model with the Adaptive Sparse Trainer, optionally quantize it, and save it
with its report."""

from __future__ import annotations

import time
from pathlib import Path

from prunesearch.commands.common import UsageError, log, model_seqlen, perplexities, targets_config
from prunesearch.safety import check_out


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
        check_out(args.out, args.overwrite)
    if not args.config and args.sparsity is None and not args.pattern:
        args.pattern = "2:4"
    config = targets_config(args)
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
    seqlen = model_seqlen(model, args)
    train_ids = data.calibration_ids(tokenizer, args.calib, settings.windows, seqlen, args.seed, args.data_dir)
    trainer = ASTTrainer(model, targets, settings, train_ids, device)
    if args.resume:
        trainer.load_checkpoint(out / "checkpoint")
        log(f"resuming at step {trainer.step} of {settings.steps}")
    elif out.exists():
        from prunesearch.safety import remove_output

        remove_output(out)
    out.mkdir(parents=True, exist_ok=True)
    from prunesearch.safety import mark_output

    mark_output(out, "ast")
    log(f"AST on {source}: {len(trainer.layers)} sparse layers, {settings.windows} C4-train-side windows of "
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
        report["ppl"] = perplexities(model.to(device), tokenizer, args.ppl.split(","), seqlen, args)
    report["history"] = history
    save_ast_model(model.to("cpu"), tokenizer, slorbs, out)
    from prunesearch.files import atomic_json

    atomic_json(out / "ast_report.json", report)
    last = history[-1] if history else {}
    print(f"AST done: {trainer.step} steps, last loss {last.get('loss', float('nan')):.4f}; SLoRB parameters "
          f"{slorb_params}; size vs fp32 {report['size']['model_ratio_vs_fp32']:.2f}x; saved to {out}")
    return 0
