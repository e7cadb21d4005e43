"""The search engine end to end on a tiny model: seeds, resumption, workers, realized sparsity, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import search_settings
from pruners.masks import Target, expected_pruned
from pruners.oneshot import sparsity_table
from pruners.targets import SparsityConfig
from search.engine import Workspace, run_search

SEEDS = {"uniform", "owl", "atp-0.05", "atp-0.1", "atp-0.2"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def _run(settings, out, **kw):
    return run_search(settings, out, report_ppl=(), progress=False, **kw)


def test_seeds_first_labelled_and_best_config_is_a_prune_config(tiny_llama_dir, tiny_calib_file, tmp_path):
    out = tmp_path / "run"
    summary = _run(search_settings(tiny_llama_dir, tiny_calib_file), out, trials=10)
    frame = pd.read_parquet(out / "trials.parquet")
    complete = frame[frame.state == "COMPLETE"]
    assert set(summary["seeds"]) == SEEDS
    assert sorted(complete[complete.label.isin(SEEDS)].label) == sorted(SEEDS)  # each exactly once
    assert set(frame.number[frame.label.isin(SEEDS)]) == set(range(5))  # measured first
    assert len(frame[frame.state.isin(["COMPLETE", "PRUNED"])]) == 10
    for col in ("fitness", "fitness_low", "wall_s", "budget_sparsity", "s[0]", "x[0]", "seqlen", "fitness_data"):
        assert col in frame.columns
    np.testing.assert_allclose(complete.budget_sparsity, 0.6, atol=1e-9)
    assert summary["best"]["fitness"] <= min(v["fitness"] for v in summary["seeds"].values())
    config = json.loads((out / "best_config.json").read_text())
    parsed = SparsityConfig.from_dict(config)
    assert set(parsed.sparsity) == {"0", "1", "2", "3"}
    assert config["meta"]["fitness"] == summary["best"]["fitness"]


def test_a_trial_realizes_the_sparsity_it_claims(tiny_llama_dir, tiny_calib_file, tmp_path):
    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file), tmp_path / "ws")
    alloc = ws.allocation(np.array([0.9, 0.2, 0.7, 0.5]))
    assert ws.space.mean(alloc) == pytest.approx(0.6, abs=1e-9)
    ws.realize(alloc)
    targets = ws.space.to_targets(alloc)
    for row in sparsity_table(ws.model):
        pruned = row["actual_sparsity"] * row["shape"][0] * row["shape"][1]
        assert round(pruned) == expected_pruned(tuple(row["shape"]), Target(targets[row["name"]]))
    ws.realize(np.zeros(4))
    assert all(r["actual_sparsity"] == 0 for r in sparsity_table(ws.model))  # dense weights come back


def test_interrupted_run_resumes_keeping_every_completed_trial(tiny_llama_dir, tiny_calib_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = search_settings(tiny_llama_dir, tiny_calib_file)
    calls = {"n": 0}
    original = Workspace.objective

    def flaky(self, trial):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, trial)

    monkeypatch.setattr(Workspace, "objective", flaky)
    summary = _run(settings, out, trials=12)
    assert summary["interrupted"]
    first = pd.read_parquet(out / "trials.parquet")
    done_before = first[first.state.isin(["COMPLETE", "PRUNED"])]
    assert len(done_before) == 6
    monkeypatch.setattr(Workspace, "objective", original)
    _run(settings, out, trials=12)
    second = pd.read_parquet(out / "trials.parquet")
    finished = second[second.state.isin(["COMPLETE", "PRUNED"])]
    assert len(finished) == 12
    merged = done_before.merge(second, on="number", suffixes=("_a", "_b"))
    assert (merged.state_a == merged.state_b).all()
    np.testing.assert_array_equal(merged.fitness_a.fillna(-1), merged.fitness_b.fillna(-1))  # kept, not redone
    complete = second[second.state == "COMPLETE"]
    assert sorted(complete[complete.label.isin(SEEDS)].label) == sorted(SEEDS)
    xs = finished[[c for c in finished.columns if c.startswith("x[")]].round(12)
    assert not xs.duplicated().any()  # nothing evaluated twice


def test_two_local_workers_never_evaluate_the_same_trial_twice(tiny_llama_dir, tiny_calib_file, tmp_path):
    out = tmp_path / "run"
    _run(search_settings(tiny_llama_dir, tiny_calib_file, sampler="qmc"), out, trials=14, workers=2)
    frame = pd.read_parquet(out / "trials.parquet")
    finished = frame[frame.state.isin(["COMPLETE", "PRUNED"])]
    assert 14 <= len(finished) <= 15  # the other worker may finish the trial it had started
    assert frame.number.is_unique
    complete = finished[finished.state == "COMPLETE"]
    assert sorted(complete[complete.label.isin(SEEDS)].label) == sorted(SEEDS)
    xs = finished[[c for c in finished.columns if c.startswith("x[")]].round(12)
    assert not xs.duplicated().any()


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_llama_dir, tiny_calib_file, tmp_path):
    with pytest.raises(ValueError, match="infeasible"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, min_sparsity=0.7, max_sparsity=0.9), tmp_path / "a", trials=1)
    with pytest.raises(ValueError, match="unknown budget kind"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, budget="latency=3ms"), tmp_path / "b", trials=1)
    with pytest.raises(ValueError, match="granularity"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, granularity="head"), tmp_path / "c", trials=1)
    out = tmp_path / "run"
    _run(search_settings(tiny_llama_dir, tiny_calib_file), out, trials=6)
    before = (out / "trials.parquet").read_bytes()
    with pytest.raises(ValueError, match="different study"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5"), out, trials=6)
    assert (out / "trials.parquet").read_bytes() == before


def test_sparsegpt_level_database_swaps_in_what_sparsegpt_computes_from_dense_inputs(tiny_llama_dir, tiny_calib_file,
                                                                                      tmp_path):
    from prunesearch import data
    from pruners.oneshot import make_pruner, prune_model

    settings = search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1)
    ws = Workspace(settings, tmp_path / "ws")
    alloc = ws.allocation(np.array([0.83, 0.37, 0.66, 0.54]))
    np.testing.assert_allclose(alloc, [0.8, 0.4, 0.7, 0.5])  # on the 0.1 grid, largest remainders rounded up
    assert ws.space.mean(alloc) == pytest.approx(0.6, abs=1e-12)
    ws.realize(alloc)
    realized = {r["name"]: r for r in sparsity_table(ws.model)}
    searched = {n: m.weight.detach().clone() for n, m in ws.realizer.modules.items()}
    targets = ws.space.to_targets(alloc)
    for name, row in realized.items():
        assert row["actual_sparsity"] == pytest.approx(targets[name], abs=0.01)

    # Block 0 sees the same (dense) inputs in the database and in a sequential one-shot run: identical weights.
    ws.realize(np.zeros(4))
    calib = data.calibration_ids(ws.tokenizer, str(tiny_calib_file), 4, 32, 0, None)
    prune_model(ws.model, make_pruner("sparsegpt"), {n: Target(v) for n, v in targets.items()}, calib)
    for name in ws.lay.projections[0]:
        torch.testing.assert_close(ws.realizer.modules[name].weight, searched[name], rtol=0, atol=0)
    assert any(not torch.equal(ws.realizer.modules[n].weight, searched[n]) for n in ws.lay.projections[3])

    reloaded = Workspace(settings, tmp_path / "ws")  # from the on-disk database
    reloaded.realize(alloc)
    for name, module in reloaded.realizer.modules.items():
        assert torch.equal(module.weight, searched[name])


def test_search_with_the_sparsegpt_database_runs_seeds_and_stays_on_the_level_grid(tiny_llama_dir, tiny_calib_file,
                                                                                   tmp_path):
    out = tmp_path / "run"
    summary = _run(search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1, sampler="evo"), out,
                   trials=10)
    frame = pd.read_parquet(out / "trials.parquet")
    complete = frame[frame.state == "COMPLETE"]
    assert set(summary["seeds"]) == SEEDS
    alloc = complete[[f"s[{i}]" for i in range(4)]].to_numpy()
    np.testing.assert_allclose(alloc / 0.1, np.round(alloc / 0.1), atol=1e-9)
    np.testing.assert_allclose(alloc.mean(axis=1), 0.6, atol=1e-12)
