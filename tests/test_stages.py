"""Coarse to fine in one command (``--granularity block,projection``): a block search, then a projection search
started from its answer, resumable, and read back by ``export``/``realize`` through the folder's final stage."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from transformers import AutoModelForCausalLM

from conftest import FAMILIES, saved_tiny_model, search_argv
from prunesearch.cli import main
from pruners.registry import layout
from search.settings import SearchSettings
from search.stages import final_run, run_stages


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def _trials(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "trials.parquet")


def test_one_command_equals_the_two_command_coarse_to_fine(tiny_llama_dir, tiny_calib_file, tmp_path):
    staged = tmp_path / "staged"
    argv = search_argv(tiny_llama_dir, tiny_calib_file, staged, "--granularity", "block,projection",
                       "--select-top", "2", trials=8)
    assert main(argv) == 0
    assert final_run(staged) == staged / "projection"
    fine = json.loads((staged / "projection" / "run_config.json").read_text())
    assert fine["granularity"] == "projection" and fine["sampler"] == "evo"
    assert fine["enqueue"] == [str((staged / "block" / "best_config.json").resolve())]

    # the same two searches by hand: the block run, then a projection run started from its answer
    block, proj = tmp_path / "block", tmp_path / "proj"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, block, "--select-top", "2", trials=8)) == 0
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, proj, "--granularity", "projection", "--sampler", "evo",
                            "--select-top", "2", "--enqueue", block / "best_config.json", trials=8)) == 0
    for mine, theirs in ((staged / "block", block), (staged / "projection", proj)):
        a, b = _trials(mine), _trials(theirs)
        assert a.label.tolist() == b.label.tolist()
        assert a.fitness.to_numpy() == pytest.approx(b.fitness.to_numpy(), rel=1e-6, nan_ok=True)
    start = _trials(staged / "projection").query("label == 'start:best_config.json'")
    answer = json.loads((staged / "block" / "best_config.json").read_text())
    lay = layout(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    spread = [answer["sparsity"][str(lay.block_of(n))] for n in lay.projection_names()]
    assert start[[f"s[{n}]" for n in lay.projection_names()]].to_numpy()[0] == pytest.approx(spread, abs=1e-9)

    # the same command again resumes both stages: nothing new is measured
    counts = [len(_trials(staged / s)) for s in ("block", "projection")]
    assert main(argv) == 0
    assert [len(_trials(staged / s)) for s in ("block", "projection")] == counts

    # export reads the folder's answer: the projection stage's best allocation
    out = tmp_path / "best.json"
    assert main(["export", "--run", str(staged), "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    chosen = json.loads((staged / "projection" / "best_config.json").read_text())
    assert exported["sparsity"] == chosen["sparsity"] and set(exported["sparsity"]) == set(lay.projection_names())

    # the predictor learns from both stages' trials (one fitness, features per depth bin) and scores on them
    pred = tmp_path / "pred"
    assert main(["predictor", "retrain", "--from", str(staged), "--out", str(pred), "--folds", "2",
                 "--members", "2"]) == 0
    training = json.loads((pred / "predictor.json").read_text())["training"]
    assert training["runs"] == [str(staged / "block"), str(staged / "projection")]
    measured = sum(len(t.query("state == 'COMPLETE' and fitness == fitness and duplicate_of != duplicate_of"))
                   for t in map(_trials, (staged / "block", staged / "projection")))
    assert training["pairs"] == measured > 8
    assert main(["predictor", "evaluate", "--predictor", str(pred), "--on", str(staged)]) == 0


def test_the_stages_share_a_time_budget_and_stop_after_an_interrupted_stage(tmp_path):
    calls = []

    def run(settings, folder, **kw):
        calls.append((settings.granularity, settings.sampler, kw["time_budget"], kw["report_ppl"], kw["study_name"]))
        return {"best": {"trial": 0, "fitness": 1.0}, "interrupted": len(calls) == 1 and stop_first}

    settings = SearchSettings(budget="sparsity=0.6")
    stop_first = False
    result = run_stages(settings, tmp_path / "a", run, None, (None, None), 600.0, None, "s", ("wikitext2",), None)
    assert [c[:2] for c in calls] == [("block", "tpe"), ("projection", "evo")]
    assert calls[0][2] == pytest.approx(300.0, abs=1.0) and calls[1][2] == pytest.approx(600.0, abs=1.0)
    assert [c[3] for c in calls] == [(), ("wikitext2",)]  # report data on the final stage only
    assert [c[4] for c in calls] == ["s-block", "s-projection"] and result["final"] == "projection"

    calls.clear()
    stop_first = True
    result = run_stages(settings, tmp_path / "b", run, "tpe", (None, None), None, None, "s", (), None)
    assert len(calls) == 1 and list(result["stages"]) == ["block"]


@pytest.mark.parametrize("family", FAMILIES)
def test_coarse_to_fine_on_every_family(family, tmp_path, tiny_tokenizer, tiny_calib_file):
    model_dir = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    out = tmp_path / "run"
    assert main(search_argv(model_dir, tiny_calib_file, out, "--granularity", "block,projection", "--select-top", "0",
                            trials=8)) == 0
    fine = _trials(out / "projection")
    names = layout(AutoModelForCausalLM.from_pretrained(model_dir)).projection_names()
    assert [c[2:-1] for c in fine.columns if c.startswith("s[")] == names  # fused QKV is one unit
    block_best = json.loads((out / "block" / "best_config.json").read_text())["meta"]["fitness"]
    start = fine.query("label == 'start:best_config.json'").fitness.iloc[0]
    assert start == pytest.approx(block_best, rel=1e-6)  # Wanda's masks are per projection: the same model
    assert json.loads((out / "projection" / "best_config.json").read_text())["meta"]["fitness"] <= start
