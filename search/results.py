"""The results of a study: the trials frame, the best allocation or the Pareto front as prune configs (with plot),
and the report of chosen allocations, pruned for real, on held-out data the search never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from prunesearch.files import atomic_json, atomic_path
from search import faults
from search.samplers import param_name, trial_label
from search.selection import Selection, select
from search.settings import LEVEL_PARAM
from search.workspace import Workspace


def _target(ws: Workspace, t: optuna.trial.FrozenTrial) -> float | None:
    """A trial's budget sparsity (a width run: the share of the units' parameters removed, as its
    ``budget_sparsity``); None for a range trial still queued (its budget level is not drawn yet)."""
    if not ws.multi:
        return ws.target_range[0]
    level = t.params.get(LEVEL_PARAM)
    return None if level is None else ws.range_target(level)


def trials_frame(study: optuna.Study, ws: Workspace):
    """One row per trial: label, state, fitness at each fidelity, wall time, sampled and effective allocation,
    and the protocol every number was measured under."""
    import pandas as pd

    s = ws.settings
    protocol = {
        "model": ws.source, "model_protocol": json.dumps(ws.model_protocol), "budget": s.budget, "pattern": s.pattern,
        "granularity": s.granularity, "pruner": s.pruner, "fitness_kind": s.fitness,
        "fitness_data": json.dumps(ws.heldout_protocol), "fitness_samples": s.fitness_samples,
        "low_fidelity_samples": s.low_fidelity_samples, "seqlen": ws.seqlen, "calib": json.dumps(ws.calib_protocol),
        "nsamples": s.nsamples, "seed": s.seed, "space": s.space,
    }
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "label": trial_label(t, s.sampler),
               "guide": t.user_attrs.get("guide"), "duplicate_of": t.user_attrs.get("duplicate_of"),
               "fail_reason": t.user_attrs.get(faults.FAIL_REASON), "worker": t.user_attrs.get("worker"),
               "fitness": t.values[0] if t.values else None,
               "fitness_low": t.user_attrs.get("fitness_low", t.intermediate_values.get(0)),
               "wall_s": t.user_attrs.get("wall_s"), "target_sparsity": _target(ws, t),
               "budget_sparsity": t.user_attrs.get("budget_sparsity"), "start": t.datetime_start}
        alloc = t.user_attrs.get("allocation")
        row["nonzero_params"] = ws.nonzero_params(np.asarray(alloc)) if alloc else None
        row.update(ws.budget_columns(t))
        row.update(ws.unit_columns(alloc))
        for u in ws.space.units:
            row[param_name(u)] = t.params.get(param_name(u))
        rows.append({**row, **protocol})
    return pd.DataFrame(rows)


def _report(ws: Workspace, allocations: dict[str, np.ndarray], datasets: list[str], limit: int | None
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Reporting data, never seen by the search: each allocation pruned for real (``Workspace.prune_for_report``,
    the way ``prunesearch prune --config`` realizes it), then perplexity and KL to the dense model on the same
    windows from one forward pass. Both are kept because they can disagree: pruning noise can lower the perplexity
    of a small model on text unlike its training data, while KL only measures the distance to the dense model.
    Returns ``{"ppl": {label: {dataset: value}}, "kl": {...}}``."""
    import math

    from prunesearch import data
    from prunesearch.evaluate import DenseReference, windows

    s = ws.settings
    calib = ws.calibration_ids()
    ws.reset()
    wins = {d: windows(data.eval_ids(ws.tokenizer, d, s.data_dir), ws.seqlen, limit) for d in datasets}
    refs = {d: DenseReference.compute(ws.model, w, ws.batch_size) for d, w in wins.items()}
    out: dict[str, dict[str, dict[str, float]]] = {"ppl": {}, "kl": {}}
    for label, alloc in allocations.items():
        ws.reset()
        ws.prune_for_report(alloc, calib)
        scores = {d: refs[d].nll_and_kl(ws.model, ws.batch_size) for d in datasets}
        out["ppl"][label] = {d: math.exp(float(nll.mean())) for d, (nll, _) in scores.items()}
        out["kl"][label] = {d: kl for d, (_, kl) in scores.items()}
    ws.reset()
    return out


def _config(ws: Workspace, t: optuna.trial.FrozenTrial) -> dict:
    """A trial's allocation as a ``prunesearch prune --config`` file, with the protocol of its fitness."""
    s = ws.settings
    meta = {"fitness": t.values[0], "fitness_kind": s.fitness, "trial": t.number,
            "label": trial_label(t, s.sampler), "budget": s.budget,
            "budget_sparsity": t.user_attrs["budget_sparsity"], "pruner": s.pruner, "model": ws.source,
            "model_protocol": ws.model_protocol, "granularity": s.granularity, "seqlen": ws.seqlen,
            "fitness_data": ws.heldout_protocol,
            "fitness_samples": s.fitness_samples, "calib": ws.calib_protocol, "nsamples": s.nsamples,
            "seed": s.seed}
    return ws.config(np.asarray(t.user_attrs["allocation"]), meta)


def _alloc(t: optuna.trial.FrozenTrial) -> np.ndarray:
    return np.asarray(t.user_attrs["allocation"])


def finish(study: optuna.Study, ws: Workspace, out: Path, report_ppl: tuple[str, ...], report_limit: int | None,
           interrupted: bool = False, selection: Selection | None = None) -> dict:
    """Write the results folder and return the summary: best found against every heuristic seed. With a
    ``selection`` (single budget, not interrupted) the best is the finalist that measures best pruned for real on
    fresh windows (``search.selection``), else the best search fitness."""
    frame = trials_frame(study, ws)
    with atomic_path(out / "trials.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    ws.space_record().save(out / "space.json")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return {"trials": len(frame), "best": None, "interrupted": interrupted}
    seeds = {t.user_attrs["seed"]: t for t in complete if "seed" in t.user_attrs}
    s = ws.settings
    summary = {
        "trials": len(frame), "complete": len(complete),
        "pruned": int((frame["state"] == "PRUNED").sum()), "interrupted": interrupted, "fitness_kind": s.fitness,
        "median_trial_s": float(frame.loc[frame["state"] == "COMPLETE", "wall_s"].median()),
    }
    if ws.multi:
        summary.update(_front(study, ws, out, seeds, report_ppl, report_limit))
    else:
        best = min(complete, key=lambda t: t.value)
        if selection is not None and selection.top and not interrupted:
            summary["selection"] = select(ws, complete, selection, out / "selection.json")
            best = next(t for t in complete if t.number == summary["selection"]["chosen"])
        config = _config(ws, best)
        if "selection" in summary:
            config["meta"]["selection"] = summary["selection"]
        atomic_json(out / "best_config.json", config)
        summary["best"] = {"trial": best.number, "label": config["meta"]["label"], "fitness": best.value,
                           "allocation": ws.unit_values(_alloc(best)),
                           "nonzero_params": ws.nonzero_params(_alloc(best))}
        summary["seeds"] = {label: {"trial": t.number, "fitness": t.value} for label, t in seeds.items()}
        if report_ppl:
            allocs = {"best": _alloc(best), **{label: _alloc(t) for label, t in seeds.items()}}
            report = _report(ws, allocs, list(report_ppl), report_limit)
            summary["report_ppl"], summary["report_kl"] = report["ppl"], report["kl"]
    if report_ppl:
        summary["report_protocol"] = {"datasets": list(report_ppl), "windows_limit": report_limit,
                                      "seqlen": ws.seqlen, "realized_with": ws.realized_with}
    atomic_json(out / "report.json", summary)
    from prunesearch.report import write_default

    write_default(out)
    return summary


def _front(study: optuna.Study, ws: Workspace, out: Path, seeds: dict, report_ppl: tuple[str, ...],
           report_limit: int | None) -> dict:
    """The Pareto front of a multi-objective run: ``pareto/*.json`` configs, ``pareto.csv``, ``pareto.png``, and
    every seed against the best front allocation at least as sparse as it."""
    import pandas as pd

    front = sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))
    rows = []
    with atomic_path(out / "pareto") as folder:  # rewritten from the study: a resumed run's front replaces the old
        folder.mkdir()
        for t in front:
            name = f"sparsity-{t.values[1]:.4f}-trial{t.number}.json"
            (folder / name).write_text(json.dumps(_config(ws, t), indent=2))
            rows.append({"trial": t.number, "label": trial_label(t, ws.settings.sampler),
                         "sparsity": t.values[1], "nonzero_params": ws.nonzero_params(_alloc(t)),
                         "fitness": t.values[0], "config": f"pareto/{name}"})
    with atomic_path(out / "pareto.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)

    def point(t: optuna.trial.FrozenTrial) -> dict:
        return {"trial": t.number, "fitness": t.values[0], "sparsity": t.values[1]}

    by_number = {t.number: t for t in front}
    versus = {}
    for label, t in seeds.items():
        at_least = [f for f in front if f.values[1] >= t.values[1] - 1e-9]
        versus[label] = {**point(t), "front": point(min(at_least, key=lambda f: f.values[0])) if at_least else None}
    _plot_front(study, front, seeds, ws.settings.fitness, ws.trade_label, out / "pareto.png")
    summary = {"objectives": [ws.settings.fitness, "sparsity"], "front": rows, "seeds": versus}
    if report_ppl:
        allocs = {label: _alloc(t) for label, t in seeds.items()}
        for label, v in versus.items():
            if label.startswith("uniform@") and v["front"] is not None:
                allocs[f"front@{label.partition('@')[2]}"] = _alloc(by_number[v["front"]["trial"]])
        report = _report(ws, allocs, list(report_ppl), report_limit)
        summary["report_ppl"], summary["report_kl"] = report["ppl"], report["kl"]
    return summary


def _plot_front(study: optuna.Study, front: list, seeds: dict, fitness_kind: str, trade_label: str, path: Path
                ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=8, c="0.7", label="trials")
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="C0", ms=4, label="Pareto front")
    families = sorted({label.partition("@")[0] for label in seeds})
    for i, family in enumerate(families):
        pts = [t for label, t in seeds.items() if label.partition("@")[0] == family]
        ax.scatter([t.values[1] for t in pts], [t.values[0] for t in pts], marker="x", c=f"C{i + 1}", label=family)
    ax.set(xlabel=trade_label, ylabel=f"{fitness_kind} (search data)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
