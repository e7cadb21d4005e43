"""Width pruning: WikiText-2 PPL of uniform vs FLAP-style vs searched widths, CPU speedups, and the Pareto front.

At 20% and 35% of block parameters removed: uniform width (every block the same, heads in whole key/value groups),
FLAP's global ranking of standardized fluctuation scores (with and without its bias compensation), and the best
widths of a width search (``SearchSettings(space="width")``, fitness KL on held-out C4, never WikiText-2) at the
same parameter count, each realized by slicing with the same FLAP scores; then the CPU speed of the sliced models
against dense, timed side by side in one run (batch 1): prefill of 512 tokens and one-token decode after it (KV
cache of 512 tokens), the median of several interleaved repetitions, beside the latency the FLOPs ratio predicts;
and the rows that no other row beats in both PPL and measured latency. Writes results/benchmarks/width{NAME}.{json,md}
and width_front{NAME}.png; the search run folders go to --runs (re-running resumes them; --trials is their total).
The search calibrates as the other rows do (same C4 samples, sequence length and scores), so the searched row is
exactly the candidate the search measured.

    PYTHONPATH=. python benchmarks/width.py [--trials 40] [--reps 15]
    PYTHONPATH=. python benchmarks/width.py --model smollm2-135m --data-dir ../shared/data --limit 64 --name=-smollm2
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
from prunesearch.evaluate import perplexity, windows
from prunesearch.models import default_seqlen, load_model
from prunesearch.pareto import non_dominated
from pruners.width import latency
from pruners.width.allocation import from_config, global_ranking, uniform_params
from pruners.width.counting import Shapes, flops_per_token, memory_bytes, shapes
from pruners.width.geometry import BlockWidth, Geometry, geometry
from pruners.width.importance import importance
from pruners.width.slicing import realize
from search.engine import SearchSettings, default_effort, run_search

SHARES = (0.2, 0.35)
CONTEXT = 512


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def budget_params(s: Shapes, geom: Geometry, share: float) -> int:
    """The whole-model ``params=`` budget that removes ``share`` of the blocks' parameters (the search's budget
    counts every parameter: embeddings, norms and LM head stay)."""
    return int(s.other_params + (1 - share) * sum(s.block_params(w) for w in geom.widths))


def searched_widths(settings: SearchSettings, run: Path, geom: Geometry, args) -> tuple[list[BlockWidth], dict]:
    """Run (or resume) a width search to ``args.trials`` trials; its best widths and a summary of the search."""
    t = time.perf_counter()
    summary = run_search(settings, run, trials=args.trials, batch_size=args.batch_size, report_ppl=(),
                         progress=False, cache_dir=args.cache_dir)
    if summary.get("best") is None:
        raise SystemExit(f"the width search in {run} completed no trial; see its search.log")
    config = json.loads((run / "best_config.json").read_text())
    return from_config(geom, config["width"]), {
        "run": str(run), "budget": settings.budget, "trials": summary["trials"], "complete": summary["complete"],
        "best_trial": summary["best"]["trial"], "best_label": summary["best"]["label"],
        "best_kl": summary["best"]["fitness"], "seeds_kl": {k: v["fitness"] for k, v in summary["seeds"].items()},
        "seconds_this_run": time.perf_counter() - t}


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


def mark_fronts(rows: list[dict]) -> None:
    """Mark each row on the Pareto front of (PPL, prefill seconds) and of (PPL, decode seconds), or not."""
    for kind in ("prefill", "decode"):
        for r, on in zip(rows, non_dominated([(r["ppl"], r[kind]) for r in rows])):
            r[f"front_{kind}"] = on


def plot(rows: list[dict], path: Path) -> None:
    """PPL against measured prefill and decode latency, each front drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, ("prefill", "decode")):
        front = sorted((r for r in rows if r[f"front_{kind}"]), key=lambda r: r[kind])
        ax.plot([1e3 * r[kind] for r in front], [r["ppl"] for r in front], "-", c="C3", lw=1, label="Pareto front")
        for i, name in enumerate(dict.fromkeys(r["allocation"] for r in rows)):
            pts = [r for r in rows if r["allocation"] == name]
            ax.scatter([1e3 * r[kind] for r in pts], [r["ppl"] for r in pts], c=f"C{i}", label=name,
                       edgecolors=["k" if r[f"front_{kind}"] else "none" for r in pts], linewidths=1.5, zorder=3)
        for r in rows:
            ax.annotate(f"{r['removed']:.0%}", (1e3 * r[kind], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel=f"measured {kind} ms ({'512 tokens' if kind == 'prefill' else 'one token after 512'})",
               ylabel="WikiText-2 PPL", title=f"PPL vs {kind} latency (outlined: on the front)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(ap)
    ap.set_defaults(nsamples=None)
    ap.add_argument("--seqlen", type=int, help="tokens per calibration, search and WikiText-2 window (default: the "
                                               "search's: 256 for the built-in model and for a real one on CPU)")
    ap.add_argument("--limit", type=int, help="score only the first N WikiText-2 windows (default: all)")
    ap.add_argument("--trials", type=int, default=40, help="width-search trials per share (default: 40)")
    ap.add_argument("--runs", default="results/bench_runs", help="where the search run folders go (not committed)")
    ap.add_argument("--cache-dir", help="cache of scores and the dense reference, shared by both searches "
                                        "(default: a folder beside the run folders)")
    ap.add_argument("--reps", type=int, default=15, help="timing repetitions per model (default: 15)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (default: 1)")
    ap.add_argument("--name", default="", help="suffix of the output files (e.g. -smollm2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, tok, source = load_model(args.model, "cpu", "float32")
    builtin = args.model is None
    effort = default_effort(builtin, "cpu")
    seqlen = default_seqlen(dense, args.seqlen or effort.get("seqlen"), builtin=builtin)
    effort.update(nsamples=args.nsamples or effort["nsamples"], seqlen=seqlen)
    stem = f"width-{Path(source).name.removesuffix('.gguf')}"
    args.cache_dir = args.cache_dir or str(Path(args.runs) / f"{stem}-cache")
    calib = data.calibration_ids(tok, "c4", effort["nsamples"], seqlen, 0, args.data_dir)
    test = data.eval_ids(tok, "wikitext2", args.data_dir)
    geom = geometry(dense)
    s = shapes(dense, geom)
    t = time.perf_counter()
    imp = importance(dense, calib, "flap", batch_size=args.batch_size, geom=geom)
    score_s = time.perf_counter() - t
    block_params = sum(s.block_params(w) for w in geom.widths)

    def ppl(model) -> float:
        return perplexity(model, test, seqlen, args.batch_size, args.limit)

    rows = [{"allocation": "dense", "removed": 0.0, "widths": geom.widths, "params": _numel(dense), "ppl": ppl(dense)}]
    models = {"dense": dense}
    searches = {}
    for share in SHARES:
        budget = budget_params(s, geom, share)
        settings = SearchSettings(model=args.model, space="width", budget=f"params={budget}", data_dir=args.data_dir,
                                  **effort)
        searched, searches[f"{share:.0%}"] = searched_widths(
            settings, Path(args.runs) / f"{stem}-removed{round(100 * share)}", geom, args)
        for name, widths, compensate in (("uniform", uniform_params(geom, s, share), False),
                                         ("flap-global", global_ranking(geom, imp, s, share), False),
                                         ("flap-global+bias", global_ranking(geom, imp, s, share), True),
                                         ("searched", searched, False)):
            model = copy.deepcopy(dense)
            realize(model, widths, imp, bias_compensation=compensate)
            label = f"{name} {share:.0%}"
            models[label] = model
            rows.append({"allocation": name, "removed": 1 - sum(s.block_params(w) for w in widths) / block_params,
                         "widths": widths, "params": _numel(model), "label": label, "ppl": ppl(model)})
            print(f"{label:>20}: {rows[-1]['params']:,} params (budget {budget:,}), ppl {rows[-1]['ppl']:.3f}",
                  flush=True)
    timing = speed(models, args.reps)
    table = latency.measure(dense, geometry(dense), CONTEXT, reps=args.reps)  # what a latency= budget predicts with
    dense_flops = flops_per_token(s, geom.widths, CONTEXT)
    for r in rows:
        r.update(flops_per_token=flops_per_token(s, r["widths"], CONTEXT),
                 table_prefill=table.predict(r["widths"]) / 1e3,
                 memory=memory_bytes(s, r["widths"], CONTEXT), **timing[r.get("label", "dense")])
        r["flops_ratio"] = r["flops_per_token"] / dense_flops
        r["widths"] = [[w.heads, w.kv_heads, w.intermediate] for w in r["widths"]]
    mark_fronts(rows)
    protocol = {"model": source, "ppl_data": data.describe("wikitext2", args.data_dir, "evaluation"),
                "seqlen": seqlen, "eval_windows": windows(test, seqlen, args.limit).shape[0],
                "eval_tokens": windows(test, seqlen, args.limit).numel(), "eval_windows_limit": args.limit,
                "calib": data.describe("c4", args.data_dir, "calibration"), "nsamples": effort["nsamples"], "seed": 0,
                "score": "flap", "search": {"trials": args.trials, **effort, "fitness": "kl", "sampler": "tpe"},
                "load_average": [round(x, 1) for x in os.getloadavg()],
                "timing": {"context": CONTEXT, "batch": 1, "threads": args.threads, "reps": args.reps,
                           "statistic": "median"},
                "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"width{args.name}.json").write_text(json.dumps(
        {"protocol": protocol, "score_seconds": score_s, "searches": searches, "rows": rows}, indent=2))
    plot(rows, out / f"width_front{args.name}.png")
    lines = markdown(rows, searches, protocol, score_s, args)
    (out / f"width{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def markdown(rows: list[dict], searches: dict, protocol: dict, score_s: float, args) -> list[str]:
    """The protocol, the table (front marks, measured and FLOPs-predicted latency) and the searches."""
    base, p = rows[0], protocol
    windows_text = "all" if args.limit is None else f"the first {p['eval_windows']}"
    search = p["search"]
    lines = [f"# Width pruning of {Path(p['model']).name} on CPU", "",
             f"WikiText-2 test PPL ({windows_text} windows of {p['seqlen']} tokens: {p['eval_tokens']} tokens); FLAP "
             f"fluctuation scores from {p['nsamples']} x {p['seqlen']} C4 calibration tokens, seed 0 "
             f"({score_s:.1f}s), used to pick the kept heads and channels of every row; +bias: FLAP's bias "
             "compensation (zero biases added first, then the removed units' mean contribution). Searched: the best "
             f"of a width search of {search['trials']} trials per share (TPE, uniform-width and FLAP seeds first; "
             f"fitness KL to dense on {search['fitness_samples']} held-out C4 sequences, never WikiText-2; "
             "calibration as above) under a params= budget of the whole model equal to the share of block "
             "parameters removed. Removed = share of the blocks' projection parameters; params = all parameters "
             f"of the sliced model. Load average (1/5/15 min) at the end of the run: {p['load_average']}. Speed: "
             f"batch 1, torch threads {args.threads}, median of {args.reps} interleaved repetitions in one run; "
             f"prefill of {CONTEXT} tokens and one decoded token after it. Predicted = dense latency x FLOPs ratio "
             f"(FLOPs per token at seqlen {CONTEXT}, pruners/width/counting.py; also one decoded token's FLOPs over "
             "that cache), stated beside the measurement, not a model of it. Front: on the Pareto front of (PPL, "
             "prefill ms) / (PPL, decode ms) among all rows. KV cache at that context, float32.", "",
             "| allocation | removed | params | PPL | prefill ms | predicted | table | speedup | decode ms | predicted "
             "| speedup | front prefill/decode | MFLOPs/token | KV KiB | widths (heads/kv/channels per block) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = " ".join(f"{h}/{kv}/{c}" for h, kv, c in r["widths"])
        front = "/".join("yes" if r[f"front_{k}"] else "-" for k in ("prefill", "decode"))
        lines.append(f"| {r['allocation']} | {r['removed']:.1%} | {r['params']:,} | {r['ppl']:.3f} | "
                     f"{1e3 * r['prefill']:.2f} | {1e3 * base['prefill'] * r['flops_ratio']:.2f} | "
                     f"{1e3 * r['table_prefill']:.2f} | "
                     f"{base['prefill'] / r['prefill']:.2f}x | {1e3 * r['decode']:.2f} | "
                     f"{1e3 * base['decode'] * r['flops_ratio']:.2f} | {base['decode'] / r['decode']:.2f}x | {front} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['memory']['kv_cache'] / 1024:.0f} | {widths} |")
    errors = [abs(r["table_prefill"] / r["prefill"] - 1) for r in rows]
    lines += ["", f"Table = the prefill latency a `latency=` budget predicts (pruners/width/latency.py: the dense "
                  f"forward, one block and block 0 sliced over a grid, measured in this run): off the measured "
                  f"prefill by {100 * statistics.median(errors):.1f}% (median over rows), {100 * max(errors):.1f}% "
                  "at most."]
    for kind in ("prefill", "decode"):
        front = sorted((r for r in rows if r[f"front_{kind}"]), key=lambda r: r[kind])
        lines += ["", f"Pareto front of PPL against {kind} latency: " + ", ".join(
            f"{r.get('label', 'dense')} ({r['ppl']:.3f}, {1e3 * r[kind]:.2f} ms)" for r in front) + "."]
    lines += ["", "| share | search budget | trials (complete) | best trial | best KL | seed KL | this run's "
              "search s |", "|---|---|---|---|---|---|---|"]
    for share, x in searches.items():
        seeds = ", ".join(f"{k} {v:.5f}" for k, v in x["seeds_kl"].items())
        lines.append(f"| {share} | {x['budget']} | {x['trials']} ({x['complete']}) | {x['best_trial']} "
                     f"({x['best_label']}) | {x['best_kl']:.5f} | {seeds} | {x['seconds_this_run']:.0f} |")
    return lines


if __name__ == "__main__":
    main()
