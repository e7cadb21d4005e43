"""Export a finished search: its best allocations as ``prune --config`` files (JSON or YAML) or as
llm-compressor recipes, each carrying its measured fitness and the protocol it was measured under. A width (or
``--space both``) run exports width configs (``prune --method width --config``); recipes cannot hold them."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

from pruners.methods import METHODS, modifiers
from prunesearch.files import read_json, read_parquet
from prunesearch.safety import UserError

# trials.parquet columns that describe how every fitness of a run was measured (see search.results.trials_frame)
PROTOCOL = ("model", "budget", "pattern", "granularity", "pruner", "fitness_kind", "fitness_data", "fitness_samples",
            "low_fidelity_samples", "seqlen", "calib", "nsamples", "seed")
FALLBACK_MODIFIER = "wanda"  # for a search pruner without a modifier: Wanda's selects without updating weights


def modifier_for(pruner: str) -> str:
    """The method whose llm-compressor modifier applies a search's allocation: the search pruner's, else Wanda's."""
    method = METHODS.get(pruner)
    return pruner if method is not None and method.modifier else FALLBACK_MODIFIER


def read_trials(run: Path) -> pd.DataFrame:
    """The run's trials table; a folder without one is not a finished search."""
    path = Path(run) / "trials.parquet"
    if not path.is_file():
        raise UserError(f"{run} is not a finished search run (no trials.parquet)")
    return read_parquet(path, "trials table")


def units(frame: pd.DataFrame) -> list[str]:
    """The search units (blocks or projections) of a trials table, in order."""
    return [c[2:-1] for c in frame.columns if c.startswith("s[")]


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed, actually measured trials (no reused duplicates), best fitness first."""
    done = frame[(frame["state"] == "COMPLETE") & frame["duplicate_of"].isna()]
    return done.sort_values(["fitness", "number"], kind="stable")


def answer_first(done: pd.DataFrame, run: Path) -> pd.DataFrame:
    """``done`` with the run's answer first: the trial its ``best_config.json`` names (the final selection's
    choice, which need not be the best search fitness), the rest best first."""
    path = Path(run) / "best_config.json"
    if not path.is_file():
        return done
    trial = (read_json(path, "best config").get("meta") or {}).get("trial")
    chosen = done["number"] == trial
    return pd.concat([done[chosen], done[~chosen]])


def _plain(value):
    """A JSON-native copy of a pandas/numpy cell."""
    return value.item() if hasattr(value, "item") else value


def trial_config(row: pd.Series, unit_names: list[str], run: Path) -> dict:
    """One trial as a ``prune --config`` dict whose ``meta`` holds its fitness and protocol."""
    meta = {"fitness": float(row["fitness"]), "trial": int(row["number"]), "label": row["label"],
            "budget_sparsity": float(row["budget_sparsity"]), "run": str(run)}
    for key in PROTOCOL:
        value = _plain(row[key])
        meta[key] = json.loads(value) if key in ("fitness_data", "calib") else value
    return {"sparsity": {u: float(row[f"s[{u}]"]) for u in unit_names}, "pattern": row["pattern"], "meta": meta}


def width_trial_config(row: pd.Series, rec, run: Path) -> dict:
    """One trial of a width (or ``--space both``) run as the config ``prune --method width --config`` and
    ``realize`` read: per-block heads and MLP channels (plus the sparsity of the kept weights), with its protocol."""
    blocks = sorted({int(u.partition(".")[0]) for u in rec.units})
    config: dict = {"width": {str(b): {"heads": int(row[f"w[{b}.attn]"]) * rec.group,
                                       "intermediate": int(row[f"w[{b}.mlp]"])} for b in blocks}}
    extra = {}
    if rec.space == "both":
        config |= {"sparsity": {str(b): float(row[f"s[{b}]"]) for b in blocks}, "pattern": "unstructured"}
        extra = {"nonzero_params": int(row["nonzero_params"]), "sliced_params": int(row["sliced_params"])}
    meta = {"fitness": float(row["fitness"]), "trial": int(row["number"]), "label": row["label"],
            "budget_sparsity": float(row["budget_sparsity"]), "run": str(run), "space": rec.space,
            "params": int(row["nonzero_params"]), "width_score": rec.width_score,
            "budget_counts": {k: _plain(row[k]) for k in ("params", "flops", "memory", "latency")
                              if k in row.index and pd.notna(row[k])}, "budget_limits": list(rec.limits), **extra}
    for key in PROTOCOL:
        value = _plain(row[key])
        meta[key] = json.loads(value) if key in ("fitness_data", "calib") else value
    return config | {"meta": meta}


def select(run: Path, top: int | None = None, pareto: bool = False) -> list[dict]:
    """The configs to export: the Pareto front of a budget-range run, else the run's answer and the next best by
    search fitness, ``top`` in all (default 1: the answer alone)."""
    run = Path(run)
    frame = read_trials(run)
    width = any(c.startswith("w[") for c in frame.columns)
    if pareto:
        table = run / "pareto.csv"
        if not table.is_file():
            raise UserError(f"{run} has no Pareto front (only a budget-range search such as "
                            f"--budget sparsity=0.6:0.8 writes one); use --top K")
        return [read_json(run / path, "Pareto config") for path in pd.read_csv(table)["config"]]
    if top is not None and top < 1:
        raise UserError("--top must be at least 1")
    best = answer_first(measured(frame), run).head(top or 1)
    if best.empty:
        raise UserError(f"{run} has no completed trial to export")
    if width:
        from predictors.width_features import WidthRecord

        if not (run / "space.json").is_file():
            raise UserError(f"{run} is a width run without space.json (an older version): re-run its search command "
                            "once, which resumes without new trials and writes it")
        rec = WidthRecord.load(run / "space.json")
        return [width_trial_config(row, rec, run) for _, row in best.iterrows()]
    return [trial_config(row, units(frame), run) for _, row in best.iterrows()]


def model_layout(source: str):
    """The prunable projections of a model, from its config alone (no weights are loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pruners.registry import layout
    from prunesearch import gguf_source
    from prunesearch.models import load_config

    path = Path(source)
    if not (gguf_source.is_gguf(source) and path.is_file()) and not (path / "config.json").is_file():
        raise UserError(f"the run's model {source} is not a local folder with a config.json; pass --model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(source))  # a GGUF file: its dequantized copy's config
    return layout(model)


def recipe(config: dict, lay, method: str) -> dict:
    """An llm-compressor recipe applying ``config`` per layer: one oneshot stage per distinct sparsity, whose
    ``targets`` are the exact projections at that sparsity (``mask_structure`` k:M for an N:M pattern)."""
    from pruners.targets import SparsityConfig

    modifier = modifiers().get(method)
    if modifier is None:
        raise UserError(f"llm-compressor modifier must be one of {', '.join(modifiers())}, got {method!r}")
    targets = SparsityConfig.from_dict(config).resolve(lay)
    levels: dict[tuple[float, int], list[str]] = defaultdict(list)
    for name, t in targets.items():
        if t.sparsity > 0:
            levels[(float(t.sparsity), t.m)].append(name)
    stages = {}
    for i, ((sparsity, m), names) in enumerate(sorted(levels.items())):
        args = {"sparsity": sparsity, "mask_structure": f"{round(sparsity * m)}:{m}" if m else "0:0",
                "targets": names, "ignore": ["re:.*lm_head"]}
        stages[f"prune_{i:03d}_stage"] = {"run_type": "oneshot", "sparsity_modifiers": {modifier: args}}
    return stages


def recipe_text(config: dict, lay, method: str) -> str:
    """The recipe as YAML, headed by comments recording where the allocation came from and how it scored."""
    meta = config.get("meta", {})
    stages = recipe(config, lay, method)
    pruned = sum(len(args["targets"]) for s in stages.values() for args in s["sparsity_modifiers"].values())
    head = [f"# llm-compressor recipe exported by prunesearch: {pruned} projections in {len(stages)} sparsity "
            f"levels, pattern {config.get('pattern', 'unstructured')}",
            "# apply: llmcompressor.oneshot(model=..., dataset=..., recipe=THIS_FILE)"]
    head += [f"# {k}: {json.dumps(v)}" for k, v in meta.items()]
    return "\n".join(head) + "\n" + yaml.safe_dump(stages, sort_keys=False, width=120)


def write(configs: list[dict], fmt: str, out: Path, lay=None, method: str | None = None) -> list[Path]:
    """Write one config to the file ``out``, or several to the folder ``out`` (one file each)."""
    ext = {"json": ".json", "yaml": ".yaml", "llmcompressor": ".yaml"}[fmt]

    def text(config: dict) -> str:
        if fmt == "json":
            return json.dumps(config, indent=2) + "\n"
        if fmt == "yaml":
            return yaml.safe_dump(config, sort_keys=False)
        return recipe_text(config, lay, method)

    if len(configs) == 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text(configs[0]))
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, config in enumerate(configs, 1):
        meta = config.get("meta", {})
        path = out / f"{rank:02d}-trial{meta.get('trial', rank)}-{meta.get('budget_sparsity', 0):.4f}{ext}"
        path.write_text(text(config))
        paths.append(path)
    return paths
