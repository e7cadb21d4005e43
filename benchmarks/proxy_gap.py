"""How well does the search's fitness stand for the final model? Each allocation's KL on the search's held-out C4
tokens as the search measures it (masks from the dense model's cached ranks) and as it is finally realized (the
sequential one-shot pruner, ``prunesearch realize``), beside its report-data figures from a search_quality run.

    PYTHONPATH=. python benchmarks/proxy_gap.py --run results/bench_runs/smollm2-70-wanda-s0.7-guided \
        --best results/bench_runs/smollm2-70-guided-200:3 --best results/bench_runs/smollm2-70-wanda-s0.7-evo \
        --quality results/benchmarks/search_quality-smollm2-70.json --name smollm2-70

Writes results/benchmarks/proxy_gap-NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pruners.methods import get_method
from search.engine import SearchSettings
from search.study import open_workspace


def best_allocations(run: Path, k: int, units: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``k`` best completed allocations of a run folder, labelled run#rank:trial."""
    frame = pd.read_parquet(run / "trials.parquet")
    done = frame[(frame.state == "COMPLETE") & frame.duplicate_of.isna()].sort_values("fitness").head(k)
    return {f"{run.name}#{i}:{int(r.number)}": np.array([r[f"s[{u}]"] for u in units])
            for i, (_, r) in enumerate(done.iterrows())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a search run whose settings (and seeds) to use")
    ap.add_argument("--best", action="append", default=[], help="RUN[:K]: the K best allocations of a run (K=1)")
    ap.add_argument("--quality", help="a search_quality JSON whose report figures to show beside")
    ap.add_argument("--cache-dir", help="the runs' shared cache (ranks, dense reference)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    settings = SearchSettings(**json.loads((run / "run_config.json").read_text()))
    ws = open_workspace(settings, Path(args.out) / f".proxy_gap-{args.name}",
                        cache_dir=args.cache_dir and Path(args.cache_dir))
    allocs = {label: ws.allocation(x) for label, x in ws.seeds().items()}  # e.g. snapped to a level grid
    allocs.update(best_allocations(run, 1, ws.space.units))
    for spec in args.best:
        path, _, k = spec.partition(":")
        allocs.update(best_allocations(Path(path), int(k or 1), ws.space.units))
    calib, n = ws.calibration_ids(), ws.heldout.shape[0]
    rows = {}
    for label, a in allocs.items():
        t = time.perf_counter()
        ws.reset()
        ws.realize(a)
        masked = ws.fitness.value(*ws.fitness.partial(ws.model, 0, n))
        ws.reset()
        ws.prune_for_report(a, calib)
        real = ws.fitness.value(*ws.fitness.partial(ws.model, 0, n))
        rows[label] = {"search_kl": masked, "realized_kl": real}
        print(f"{label}: search KL {masked:.4f}, realized {real:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
    write(rows, args, settings, ws.realized_with)


def write(rows: dict, args, settings: SearchSettings, realized_with: str) -> None:
    """The table, with the report figures of ``--quality`` (its seeds and its searched best) where known."""
    report = {}
    if args.quality:
        q = json.loads(Path(args.quality).read_text())
        s = next(v for k, v in q.items() if "/" in k and "report_ppl" in v)
        data = next(iter(s["report_ppl"]["best"]))
        report = {label: (s["report_kl"][label][data], s["report_ppl"][label][data]) for label in s["report_ppl"]}
        report[f"{Path(args.run).name}#0:{s['best']['trial']}"] = report.pop("best")
    out = Path(args.out)
    (out / f"proxy_gap-{args.name}.json").write_text(json.dumps({"settings": settings.__dict__, "rows": rows,
                                                                 "report": report}, indent=1, default=str))
    levels = get_method(settings.pruner).realizer == "levels"
    how = ("stitched from the level database: every projection pruned at each level from the dense model's inputs"
           if levels else "masks from the dense model's cached ranks")
    lines = [f"# The search's fitness against the realized model ({args.name})", "",
             f"Model {settings.model}, {settings.budget}, {settings.pruner} {'level database' if levels else 'ranks'}"
             f", {settings.granularity} granularity. Search KL: KL to the dense model on the search's "
             f"{settings.fitness_samples} held-out C4 sequences of {settings.seqlen} tokens, candidates realized as "
             f"the search does ({how}). Realized KL: the same tokens after pruning for real ({realized_with}, "
             f"as `prunesearch realize` does). Report columns: WikiText-2 test KL and PPL of the "
             f"realized model from `{args.quality}` (first windows as stated there).", "",
             "| allocation | search KL | realized KL | gap | WikiText-2 KL | WikiText-2 PPL |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        kl, ppl = report.get(label, (None, None))
        cells = f"{kl:.4f} | {ppl:.1f}" if kl is not None else "– | –"
        lines.append(f"| {label} | {r['search_kl']:.4f} | {r['realized_kl']:.4f} | "
                     f"{r['realized_kl'] - r['search_kl']:+.4f} | {cells} |")
    (out / f"proxy_gap-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
