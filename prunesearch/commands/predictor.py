"""The ``predictor`` commands: retrain the accuracy predictor on the pairs of finished runs, or score a saved one on
a run."""

from __future__ import annotations

from pathlib import Path

from prunesearch.commands.common import UsageError
from prunesearch.safety import check_out


def _print_metrics(rows: dict[str, dict]) -> None:
    print(f"{'predictor':<22} {'pairs':>6} {'kendall_tau':>12} {'spearman':>9} {'rmse':>11} {'top10_prec':>10}")
    for name, m in rows.items():
        print(f"{name:<22} {m['n']:>6} {m['kendall_tau']:>12.4f} {m['spearman']:>9.4f} {m['rmse']:>11.4g} "
              f"{m['top10_precision']:>10.3f}")


def cmd_predictor_retrain(args) -> int:
    from predictors.features import make_spec
    from predictors.metrics import cross_validate
    from predictors.model import FitnessPredictor, data_hash
    from predictors.pairs import combine, file_pairs, pairs_space, run_pairs
    from search.stages import stage_runs

    runs = [run for given in args.runs for run in stage_runs(given)]
    out = check_out(args.out, args.overwrite)
    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    if args.members < 1:
        raise UsageError("--members must be at least 1")
    spec = make_spec(args.depth_bins, pairs_space(runs, args.pairs))
    pairs = combine([run_pairs(r, spec) for r in runs] + [file_pairs(Path(p), spec) for p in args.pairs],
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
    training = {"runs": [str(r) for r in runs], "pairs_files": [str(p) for p in args.pairs],
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
    print(f"trained on {len(pairs)} pairs from {len(runs)} run(s) and {len(args.pairs)} pairs file(s); "
          f"saved to {out}")
    return 0


def cmd_predictor_evaluate(args) -> int:
    from predictors.features import check_spec, make_spec
    from predictors.metrics import ranking_metrics
    from predictors.model import FitnessPredictor
    from predictors.pairs import check_compatible, combine, run_pairs
    from search.stages import stage_runs

    model, meta = FitnessPredictor.load(Path(args.predictor))
    spec = meta["feature_spec"]
    check_spec(make_spec(spec.get("depth_bins", 0), spec.get("space", "sparsity")), spec)
    on = stage_runs(args.on)
    pairs = combine([run_pairs(r, spec) for r in on], args.allow_mixed)
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
    if {str(r) for r in on} & {str(Path(r)) for r in training.get("runs", [])}:
        print(f"note: {args.on} was part of this predictor's training data; these are not held-out numbers")
    return 0
