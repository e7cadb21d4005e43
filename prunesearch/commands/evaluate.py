"""The ``eval`` command: perplexity, KL to a dense reference and zero-shot tasks of one model."""

from __future__ import annotations

import json

from prunesearch.commands.common import log, model_seqlen, perplexities


def cmd_eval(args) -> int:
    from prunesearch.models import describe_model, load_model, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, source = load_model(args.model, device, args.dtype)
    seqlen = model_seqlen(model, args)
    results: dict = {"model": source, "model_protocol": describe_model(source), "seqlen": seqlen}
    names = [n for n in (args.ppl or "").split(",") if n]
    if names:
        results["ppl"] = perplexities(model, tokenizer, names, seqlen, args)
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
    log(f"KL to {ref_source}: {kl:.5f}")
    return {"kl": kl, "reference": ref_source, "tokens": int(ids.numel()), "seqlen": seqlen,
            "heldout": data.describe("c4", args.data_dir), "seed": args.seed}
