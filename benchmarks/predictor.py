"""Does the accuracy predictor save real evaluations, and how well does it rank with few pairs?

(a) Real evaluations each sampler needs to come within 1% of the best fitness of a long reference run (or,
    with --reference 0, of the best any run found): predictor-guided (TPE in the narrowed space) vs TPE, QMC and
    the budget-neutral evolution, several sampler seeds each, median. Every run is one Optuna study on the same
    fitness (Wanda scores, KL to the dense model on held-out C4 tokens, seed 0); one Workspace is shared
    in-process. An evaluation is a finished trial (pruned trials count as one).
(b) Kendall τ on held-out pairs vs training pairs (25, 50, 100, 200) for the log, rank and pairwise targets.
(c) Plots: anytime curves, τ vs pairs, predicted vs measured.

    PYTHONPATH=. python benchmarks/predictor.py [--seeds 3] [--trials 100] [--reference 300]
    PYTHONPATH=. python benchmarks/predictor.py --model smollm2-135m --granularity projection --reference 0 \
        --samplers guided,evo --data-dir ../shared/data --name=-smollm2-projection70
    PYTHONPATH=. python benchmarks/predictor.py --model smollm2-135m --space width --budget params=84% \
        --reference 0 --samplers guided,tpe --trials 40 --data-dir ../shared/data --name=-smollm2-width84

Run folders go to --runs (re-running resumes them); curated outputs to results/benchmarks/predictor_*.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from predictors.features import features, make_spec
from predictors.metrics import ranking_metrics
from predictors.model import FitnessPredictor
from search.engine import SearchSettings, default_effort, check_run_folder, enqueue_seeds, finish, open_study, optimize
from search.study import open_workspace
from search.guided import Guide, GuideConfig
from search.screening import smooth_share
from search.samplers import make_sampler
from search.workspace import Workspace


def run(ws: Workspace, out: Path, sampler: str, seed: int, trials: int, guided: bool) -> pd.DataFrame:
    """One search on the shared workspace (resumable); returns its trials frame."""
    settings = dataclasses.replace(ws.base_settings, sampler=sampler)
    check_run_folder(settings, out)
    ws.settings, ws.out = settings, out
    study = open_study(settings, out, None, "prunesearch", ws.space)
    study.sampler = make_sampler(sampler, ws.space, 1000 * seed + 17 + len(study.trials))
    enqueue_seeds(study, ws, requeue_running=True)
    t = time.perf_counter()
    if guided:
        Guide(GuideConfig(seed=seed))(study, ws, trials, None, False)
    else:
        optimize(study, ws, trials, None, False)
    finish(study, ws, out, (), None)
    frame = pd.read_parquet(out / "trials.parquet")
    best = frame.fitness[frame.state == "COMPLETE"].min()
    print(f"{out.name}: best {best:.5f} in {time.perf_counter() - t:.0f}s", flush=True)
    return frame


def evaluations_to(frame: pd.DataFrame, threshold: float) -> tuple[float, np.ndarray]:
    """(evaluations until best ≤ threshold or inf, best-so-far curve) over finished trials in order."""
    f = frame[frame.state.isin(["COMPLETE", "PRUNED"])].sort_values("number")
    best = f.fitness.where(f.state == "COMPLETE").fillna(np.inf).cummin().to_numpy()
    hit = np.nonzero(best <= threshold)[0]
    return (float(hit[0] + 1) if len(hit) else np.inf), best


def tau_vs_pairs(X: np.ndarray, y: np.ndarray, sizes: list[int], repeats: int, seed: int = 0) -> pd.DataFrame:
    """Held-out τ of predictors trained on n random pairs (30% of the pool held out, fixed)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, pool = order[: int(0.3 * len(y))], order[int(0.3 * len(y)):]
    rows = []
    for variant, kw in {"log": {}, "rank": {"target": "rank"}, "pairwise": {"objective": "pairwise"}}.items():
        for n in sizes:
            for rep in range(repeats):
                train = rng.choice(pool, size=min(n, len(pool)), replace=False)
                model = FitnessPredictor(random_state=rep, **kw).fit(X[train], y[train])
                m = ranking_metrics(y[test], model.predict(X[test]))
                rows.append({"target": variant, "pairs": n, "repeat": rep, **m})
    return pd.DataFrame(rows), test, pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--reference", type=int, default=300)
    ap.add_argument("--samplers", default="guided,tpe,qmc,evo")
    ap.add_argument("--repeats", type=int, default=3, help="training draws per pair count in (b)")
    ap.add_argument("--runs", default="results/bench_predictor")
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--model", help="another model (default: the built-in one)")
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--fitness-samples", type=int, help="default: the search's effort for this model and device")
    ap.add_argument("--low-fidelity-samples", type=int)
    ap.add_argument("--budget", default="0.7", help="unstructured sparsity, or a width budget such as params=84%%")
    ap.add_argument("--space", default="sparsity", choices=["sparsity", "width"])
    ap.add_argument("--granularity", default="block", choices=["block", "projection"])
    ap.add_argument("--data-dir")
    ap.add_argument("--cache-dir", help="shared cache of ranks and the dense reference")
    ap.add_argument("--name", default="", help="suffix of the output files")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    effort = default_effort(args.model is None, "cpu")
    given = {"seqlen": args.seqlen, "fitness_samples": args.fitness_samples,
             "low_fidelity_samples": args.low_fidelity_samples}
    effort.update({k: v for k, v in given.items() if v is not None})
    budget = args.budget if "=" in args.budget else f"sparsity={args.budget}"
    settings = SearchSettings(model=args.model, budget=budget, granularity=args.granularity, space=args.space,
                              data_dir=args.data_dir, **effort)
    ws = open_workspace(settings, runs / "workspace", cache_dir=args.cache_dir)
    ws.base_settings = settings
    frames = {}
    if args.reference:
        frames["reference"] = run(ws, runs / "reference-tpe", "tpe", 99, args.reference, False)
    for seed in range(args.seeds):
        for name in args.samplers.split(","):
            sampler = "tpe" if name == "guided" else name
            frames[f"{name}/{seed}"] = run(ws, runs / f"{name}-s{seed}", sampler, seed, args.trials, name == "guided")
    ref = frames.get("reference", pd.concat(frames.values()))
    ref_best = float(ref.fitness[ref.state == "COMPLETE"].min())
    ref_label = (f"Reference: TPE, {args.reference} trials, best KL {ref_best:.5f}." if args.reference else
                 f"Reference: the best allocation any run below found, KL {ref_best:.5f}.")
    threshold = 1.01 * ref_best
    rows, curves = [], []
    for key, frame in frames.items():
        if key == "reference":
            continue
        name, seed = key.split("/")
        n, best = evaluations_to(frame, threshold)
        n5, _ = evaluations_to(frame, 1.05 * ref_best)
        full = frame[frame.state.isin(["COMPLETE", "PRUNED"])]
        rows.append({"sampler": name, "seed": int(seed), "evaluations_to_1pct": n, "evaluations_to_5pct": n5,
                     "best": float(best[-1]),
                     "best_at_25": float(best[min(25, len(best)) - 1]),
                     "best_at_50": float(best[min(50, len(best)) - 1]), "trials": len(full),
                     "pruned": int((full.state == "PRUNED").sum()), "wall_s": float(full.wall_s.sum())})
        curves.append(pd.DataFrame({"sampler": name, "seed": int(seed), "evaluations": np.arange(1, len(best) + 1),
                                    "best": best}))
    table = pd.DataFrame(rows)
    table.to_csv(out / f"predictor_search{args.name}.csv", index=False)
    curves_df = pd.concat(curves)
    med = table.groupby("sampler", sort=False).agg(
        evaluations_to_1pct=("evaluations_to_1pct", "median"), reached=("evaluations_to_1pct",
                                                                         lambda v: int(np.isfinite(v).sum())),
        evaluations_to_5pct=("evaluations_to_5pct", "median"),
        best=("best", "median"), best_at_25=("best_at_25", "median"), best_at_50=("best_at_50", "median"),
        wall_s=("wall_s", "median"))

    # (b) τ vs pairs on the pooled complete trials of every run (duplicates removed)
    rec = ws.space_record()
    spec = make_spec(8, rec.space)
    cols = rec.columns
    pool = pd.concat(frames.values())
    pool = pool[pool.state == "COMPLETE"].drop_duplicates(subset=cols)
    X, y = features(pool[cols].to_numpy(np.float64), rec, spec), pool.fitness.to_numpy(np.float64)
    taus, test, train_pool = tau_vs_pairs(X, y, [25, 50, 100, 200], args.repeats)
    taus.to_csv(out / f"predictor_tau{args.name}.csv", index=False)
    tau_med = taus.groupby(["target", "pairs"]).median(numeric_only=True).reset_index()
    scatter_model = FitnessPredictor(random_state=0).fit(X[train_pool[:200]], y[train_pool[:200]])
    pred, std = scatter_model.predict(X[test], return_std=True)

    space = ws.space
    share = smooth_share(space)
    if args.space == "sparsity":
        what = f"{float(args.budget):.0%} unstructured, {args.granularity} granularity, Wanda scores"
        seeds = "uniform, OWL, ATP over its slope grid"
    else:
        what = f"width under {budget} (key/value groups and MLP channels kept per block, FLAP importance)"
        seeds = "uniform-width, FLAP"
    protocol = (f"Model {args.model or 'built-in (LLaMA-style, 6 blocks, hidden 128)'} ({ws.model_protocol}), "
                f"{what} ({len(space.units)} units, sampled bounds [{space.low:.2f}, {space.high:.2f}]), fitness = KL "
                f"to the dense model on {effort['fitness_samples']} × {ws.seqlen} held-out C4 tokens (seed 0; "
                f"non-seed TPE/QMC/evo trials may stop at the {effort['low_fidelity_samples']}-sequence rung, guided "
                f"picks are always measured in full), calibration {effort['nsamples']} × {ws.seqlen} C4 tokens (seed "
                f"0); CPU, {args.threads} torch thread(s).")
    cfg = GuideConfig()
    local = cfg.local + (1 - cfg.local) * share
    lines = ["# Accuracy predictor: real evaluations saved and ranking quality", "", protocol, "",
             f"## (a) Evaluations to reach within 1% of the reference best (KL ≤ {threshold:.5f})", "",
             f"{ref_label} {args.seeds} sampler seeds × "
             f"{args.trials} trials per sampler; median over seeds (inf = not reached within {args.trials}). "
             f"Guided = warm-up of the heuristic seeds ({seeds}) + Sobol points, then rounds of: fit an "
             f"{cfg.members}-member bootstrap XGBoost ensemble; screen {cfg.screen:,} points, {local:.0%} of them "
             f"small moves of the three best measured allocations "
             f"({'evolution children' if share else 'per-unit noise and depth waves'}) "
             f"and the rest random points of the bounds ({share:.0%} of those smooth depth profiles; 1 − blocks/units "
             f"= {share:.2f} here), which narrow the bounds; add {cfg.batch} TPE asks in the narrowed bounds and the "
             f"{cfg.screen_top} best screened points; measure the best {cfg.measure} by mean − {cfg.kappa:g}·std.", "",
             "| sampler | evaluations to 1% (median) | seeds reached | evaluations to 5% (median) | best KL @25 | "
             f"best KL @50 | best KL @{args.trials} | search wall s (median) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in med.iterrows():
        lines.append(f"| {name} | {r.evaluations_to_1pct:g} | {int(r.reached)}/{args.seeds} | "
                     f"{r.evaluations_to_5pct:g} | {r.best_at_25:.5f} | "
                     f"{r.best_at_50:.5f} | {r.best:.5f} | {r.wall_s:.0f} |")
    if "guided" in med.index:
        for col, label in (("evaluations_to_1pct", "1%"), ("evaluations_to_5%".replace("%", "pct"), "5%")):
            base = med.drop(index="guided")[col].min()
            g = med.loc["guided", col]
            ratio = f"ratio {base / g:.2f}×" if np.isfinite(g) and np.isfinite(base) else (
                "not comparable: a median is censored (not reached within the trials)")
            lines += ["", f"Within {label}: best non-predictor sampler {base:g} evaluations (median), guided {g:g}; "
                          f"{ratio} (goal ≥ 3× at 1%)."]
    lines += ["", "Per seed (evaluations to 1% / to 5%; pruned trials count as one evaluation though they cost a "
                  "quarter):", "", "| sampler | " + " | ".join(f"seed {i}" for i in range(args.seeds)) + " |",
              "|---|" + "---|" * args.seeds]
    for name, g in table.groupby("sampler", sort=False):
        cells = [f"{a:g} / {b:g}" for a, b in zip(g.evaluations_to_1pct, g.evaluations_to_5pct)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## (b) Kendall τ on held-out pairs vs training pairs", "",
              f"Pool: {len(y)} distinct measured allocations from all runs above; {len(test)} held out (random 30%), "
              f"training pairs drawn from the rest, {args.repeats} draws each, median. Features: spec v1, 8 depth "
              "bins; predictor: 8-member bootstrap ensemble, 200 trees of depth 3.", "",
              "| target | 25 | 50 | 100 | 200 |", "|---|---|---|---|---|"]
    for target, g in tau_med.groupby("target"):
        cells = [f"{v:.3f}" for v in g.sort_values("pairs").kendall_tau]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "Top-10% precision (median) at 200 pairs: " + ", ".join(
        f"{t} {g[g.pairs == 200].top10_precision.iloc[0]:.2f}" for t, g in tau_med.groupby("target")), ""]
    (out / f"predictor{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"predictor{args.name}.json").write_text(json.dumps({"reference_best": ref_best, "threshold": threshold,
                                                    "median": med.reset_index().to_dict("records"),
                                                    "pool_pairs": int(len(y))}, indent=2, default=float))
    plot(curves_df, threshold, tau_med, y[test], pred, std, out, args.name)
    print("\n".join(lines))


def plot(curves: pd.DataFrame, threshold: float, tau_med: pd.DataFrame, measured: np.ndarray, pred: np.ndarray,
         std: np.ndarray, out: Path, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in curves.groupby("sampler", sort=False):
        m = g.groupby("evaluations").best.median()
        ax.plot(m.index, m.values, label=name)
    ax.axhline(threshold, color="k", ls=":", lw=1, label="reference best + 1%")
    ax.set(xlabel="real evaluations", ylabel="best KL so far (median over seeds)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"predictor_anytime{suffix}.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 4))
    for target, g in tau_med.groupby("target"):
        ax.plot(g.pairs, g.kendall_tau, marker="o", label=target)
    ax.axhline(0.85, color="k", ls=":", lw=1)
    ax.set(xlabel="training pairs", ylabel="Kendall τ (held-out)", xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"predictor_tau{suffix}.png", dpi=120)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.errorbar(measured, pred, yerr=std, fmt=".", alpha=0.6)
    lim = [min(measured.min(), pred.min()), max(measured.max(), pred.max())]
    ax.plot(lim, lim, "k:", lw=1)
    ax.set(xlabel="measured KL", ylabel="predicted KL (200 training pairs)", xscale="log", yscale="log")
    fig.tight_layout()
    fig.savefig(out / f"predictor_scatter{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
