"""``prunesearch export``: configs that ``prune --config`` reads back, and llm-compressor recipes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import finished_search, search_settings

from prunesearch import export
from prunesearch.cli import main
from pruners.targets import SparsityConfig
from search.engine import run_search


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tiny_calib_file, tmp_path_factory):
    """A finished 8-trial search on the tiny LLaMA (60% budget)."""
    return finished_search(tiny_llama_dir, tiny_calib_file, tmp_path_factory.mktemp("export"), 8)


def _prune(config_path, model, tiny_calib_file, out) -> dict:
    """``prunesearch prune --config``; the per-projection targets it applied."""
    assert main(["prune", "--config", str(config_path), "--method", "wanda", "--model", model, "--calib",
                 str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    return {r["name"]: r["target_sparsity"] for r in json.loads((out / "prune_report.json").read_text())["layers"]}


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_export_round_trips_through_prune_config(finished_run, tiny_calib_file, tmp_path, fmt):
    out = tmp_path / f"best.{fmt}"
    assert main(["export", "--run", str(finished_run), "--format", fmt, "--out", str(out)]) == 0
    best = json.loads((finished_run / "best_config.json").read_text())
    exported = json.loads(out.read_text()) if fmt == "json" else yaml.safe_load(out.read_text())
    assert exported["sparsity"] == best["sparsity"]
    assert exported["meta"]["trial"] == best["meta"]["trial"]
    assert exported["meta"]["fitness"] == pytest.approx(best["meta"]["fitness"])
    for key in ("seqlen", "fitness_samples", "nsamples", "calib", "fitness_data", "model", "pruner"):
        assert exported["meta"][key] == best["meta"][key]
    applied = _prune(out, best["meta"]["model"], tiny_calib_file, tmp_path / "pruned")
    lay = export.model_layout(best["meta"]["model"])
    expected = {n: t.sparsity for n, t in SparsityConfig.from_dict(best).resolve(lay).items()}
    assert applied == pytest.approx(expected, abs=1e-12)
    assert len(set(round(v, 9) for v in applied.values())) > 1  # a real per-layer allocation, not uniform


def test_top_k_is_sorted_and_each_file_is_a_config(finished_run, tmp_path):
    out = tmp_path / "top"
    assert main(["export", "--run", str(finished_run), "--top", "3", "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert len(files) == 3
    configs = [SparsityConfig.load(f) for f in files]
    fitness = [json.loads(f.read_text())["meta"]["fitness"] for f in files]
    assert fitness == sorted(fitness)
    assert len({json.dumps(c.sparsity, sort_keys=True) for c in configs}) == 3  # duplicates are not re-exported


def test_recipe_carries_every_layer_sparsity(finished_run, tmp_path):
    out = tmp_path / "recipe.yaml"
    assert main(["export", "--run", str(finished_run), "--format", "llmcompressor", "--out", str(out)]) == 0
    recipe = yaml.safe_load(out.read_text())
    best = json.loads((finished_run / "best_config.json").read_text())
    lay = export.model_layout(best["meta"]["model"])
    carried = {}
    for stage_name, stage in recipe.items():
        assert stage_name.endswith("_stage") and stage["run_type"] == "oneshot"
        (modifier, args), = stage["sparsity_modifiers"].items()
        assert modifier == "WandaPruningModifier"  # the run searched with wanda ranks
        assert args["mask_structure"] == "0:0" and args["ignore"] == ["re:.*lm_head"]
        for name in args["targets"]:
            carried[name] = args["sparsity"]
    assert carried == {n: t.sparsity for n, t in SparsityConfig.from_dict(best).resolve(lay).items()}
    assert len(recipe) == len(set(best["sparsity"].values()))  # one stage per distinct level (4 blocks)


def test_recipe_of_an_nm_config_gives_each_level_its_mask_structure(tiny_llama_dir):
    lay = export.model_layout(str(tiny_llama_dir))
    config = {"sparsity": {"0": 0.25, "3": 0.75, "model.layers.1.mlp.down_proj": 0.0}, "default": 0.5,
              "pattern": "2:4"}
    recipe = export.recipe(config, lay, "sparsegpt")
    levels = {args["sparsity"]: (args["mask_structure"], len(args["targets"]))
              for stage in recipe.values() for args in [stage["sparsity_modifiers"]["SparseGPTModifier"]]}
    assert levels == {0.25: ("1:4", 7), 0.5: ("2:4", 13), 0.75: ("3:4", 7)}  # the dense down_proj is left out
    text = export.recipe_text(config, lay, "sparsegpt")
    assert yaml.safe_load(text)["prune_001_stage"]["sparsity_modifiers"]["SparseGPTModifier"]["mask_structure"] \
        == "2:4"  # a string, not YAML 1.1's sexagesimal 124


def test_bad_requests_exit_2(finished_run, tmp_path, capsys):
    assert main(["export", "--run", str(finished_run), "--pareto", "--out", str(tmp_path / "p")]) == 2
    assert "no Pareto front" in capsys.readouterr().err
    assert main(["export", "--run", str(finished_run), "--top", "0", "--out", str(tmp_path / "t")]) == 2
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "not a finished search" in capsys.readouterr().err
    (tmp_path / "exists.json").write_text("{}")
    assert main(["export", "--run", str(finished_run), "--out", str(tmp_path / "exists.json")]) == 2


def test_pareto_export_writes_one_config_per_front_allocation(tiny_llama_dir, tiny_calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "range"
    run_search(search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5:0.7", sampler="nsga2"), run,
               trials=16, report_ppl=(), progress=False)
    front = [json.loads((run / p).read_text()) for p in pd.read_csv(run / "pareto.csv")["config"]]
    assert main(["export", "--run", str(run), "--pareto", "--format", "llmcompressor", "--out",
                 str(tmp_path / "r")]) == 0
    recipes = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "r").iterdir())]
    assert len(recipes) == len(front) >= 2
    lay = export.model_layout(str(tiny_llama_dir))
    for config, recipe in zip(front, recipes):
        carried = {name: args["sparsity"] for stage in recipe.values()
                   for args in stage["sparsity_modifiers"].values() for name in args["targets"]}
        assert carried == {n: t.sparsity for n, t in SparsityConfig.from_dict(config).resolve(lay).items()}
