"""What the command implementations share: the usage error, progress lines on stderr, the targets of
``--sparsity``/``--config``/``--pattern``, the sequence length, perplexities and the sparsity table."""

from __future__ import annotations

import sys

from prunesearch.safety import UserError


class UsageError(UserError):
    """Bad input from the user: reported as one line on stderr, exit status 2, nothing written."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_wbits(method: str, wbits: int | None) -> None:
    """``--wbits`` takes 2..8 bits and only a method that quantizes (``pruners.methods``); refuse it before loading."""
    from pruners.methods import get_method, names

    if wbits is not None and (not get_method(method).quantizes or not 2 <= wbits <= 8):
        raise UsageError(f"--wbits takes 2..8 and only works with --method {' or '.join(names(quantizes=True))}")


def targets_config(args):
    from pruners.targets import SparsityConfig

    if args.config:
        config = SparsityConfig.load(args.config)
        if args.pattern and args.pattern != config.pattern:
            raise UsageError(f"--pattern {args.pattern} contradicts the config's pattern {config.pattern}")
        return config
    if args.sparsity is None and not (args.pattern and ":" in args.pattern):
        raise UsageError("give --sparsity P, --config FILE, or an N:M --pattern")
    return SparsityConfig.uniform(args.sparsity, args.pattern or "unstructured")


def model_seqlen(model, args) -> int:
    from prunesearch.models import default_seqlen

    return default_seqlen(model, args.seqlen, builtin=args.model is None)


def perplexities(model, tokenizer, names: list[str], seqlen: int, args) -> dict:
    from prunesearch import data
    from prunesearch.evaluate import perplexity

    out = {}
    for name in names:
        ids = data.eval_ids(tokenizer, name, args.data_dir)
        limit = args.limit if getattr(args, "limit", None) else (256 if name == "c4" else None)
        out[name] = {"ppl": perplexity(model, ids, seqlen, args.batch_size, limit),
                     "seqlen": seqlen, "windows": min(ids.numel() // seqlen, limit or ids.numel()),
                     "source": data.describe(name, args.data_dir)}
        log(f"ppl {name}: {out[name]['ppl']:.3f}")
    return out


def print_sparsity(rows: list[dict]) -> None:
    blocks: dict[int, list[dict]] = {}
    for r in rows:
        blocks.setdefault(r["block"], []).append(r)
    print(f"{'block':>5} {'target':>8} {'actual':>8}")
    for b, rs in blocks.items():
        n = sum(r["shape"][0] * r["shape"][1] for r in rs)
        actual = sum(r["actual_sparsity"] * r["shape"][0] * r["shape"][1] for r in rs) / n
        target = sum((r["target_sparsity"] or 0) * r["shape"][0] * r["shape"][1] for r in rs) / n
        print(f"{b:>5} {target:>8.4f} {actual:>8.4f}")


def print_widths(report: dict, out) -> None:
    """The per-block widths of a width pruning's report against the dense ones, and its parameter counts."""
    print(f"{'block':>5} {'heads':>9} {'kv':>7} {'channels':>13}")
    for row in report["layers"]:
        dense = row["dense"]
        print(f"{row['block']:>5} {row['heads']:>4}/{dense['heads']:<4} {row['kv_heads']:>3}/{dense['kv_heads']:<3} "
              f"{row['intermediate']:>6}/{dense['intermediate']:<6}")
    before, after = report["before"], report["after"]
    print(f"parameters {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.1%}; block "
          f"projections {after['block_params'] / before['block_params']:.1%}); saved to {out}")
