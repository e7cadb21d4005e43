"""The search engine end to end on a tiny model: seeds, resumption, workers, realized sparsity, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import interrupt_objective_at, search_settings
from pruners.masks import Target, expected_pruned
from pruners.oneshot import sparsity_table
from pruners.targets import SparsityConfig
from search.engine import Workspace, open_study, run_search

SEEDS = {"uniform", "owl", "atp-0.1", "atp-0.2", "atp-0.3", "atp-0.4", "atp-0.5"}


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
    assert set(frame.number[frame.label.isin(SEEDS)]) == set(range(7))  # measured first
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
    original = interrupt_objective_at(monkeypatch, 7)
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
    assert len(finished) == 14  # exactly: a start beyond the count is skipped before it measures anything
    assert frame[frame.state == "FAIL"].number.size <= 1
    assert frame.number.is_unique
    complete = finished[finished.state == "COMPLETE"]
    assert sorted(complete[complete.label.isin(SEEDS)].label) == sorted(SEEDS)
    xs = finished[[c for c in finished.columns if c.startswith("x[")]].round(12)
    assert not xs.duplicated().any()


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_llama_dir, tiny_calib_file, tmp_path):
    with pytest.raises(ValueError, match="infeasible"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, min_sparsity=0.7, max_sparsity=0.9), tmp_path / "a",
             trials=1)
    with pytest.raises(ValueError, match="unknown budget kind"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, budget="energy=3J"), tmp_path / "b", trials=1)
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

    settings = search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1,
                               stats_inputs="dense")
    assert search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt").stats_inputs == "pruned"  # default
    assert search_settings(tiny_llama_dir, tiny_calib_file).stats_inputs == "dense"  # wanda's default
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
    settings = search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1, sampler="evo")
    summary = _run(settings, out, trials=10)
    frame = pd.read_parquet(out / "trials.parquet")
    complete = frame[frame.state == "COMPLETE"]
    assert set(summary["seeds"]) == SEEDS
    alloc = complete[[f"s[{i}]" for i in range(4)]].to_numpy()
    np.testing.assert_allclose(alloc / 0.1, np.round(alloc / 0.1), atol=1e-9)
    np.testing.assert_allclose(alloc.mean(axis=1), 0.6, atol=1e-12)


def _dominates(a, b) -> bool:
    """Minimize fitness, maximize sparsity (to 1e-9: equal budgets tie)."""
    sa, sb = round(a.budget_sparsity, 9), round(b.budget_sparsity, 9)
    return a.fitness <= b.fitness and sa >= sb and (a.fitness < b.fitness or sa > sb)


def test_budget_range_searches_the_pareto_front_of_fitness_and_sparsity(tiny_llama_dir, tiny_calib_file, tmp_path):
    out = tmp_path / "run"
    settings = search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5:0.7", sampler="nsga2")
    summary = _run(settings, out, trials=28)
    frame = pd.read_parquet(out / "trials.parquet")
    complete = frame[frame.state == "COMPLETE"]
    assert len(complete) == 28  # a multi-objective study measures every trial in full
    # Every trial meets its own sampled budget exactly, inside the range.
    np.testing.assert_allclose(complete.budget_sparsity, complete.target_sparsity, atol=1e-9)
    assert complete.target_sparsity.between(0.5, 0.7).all()
    assert complete.target_sparsity.nunique() > 3
    seeds = {f"{label}@{t}" for label in SEEDS for t in ("0.5", "0.6", "0.7")}
    assert set(summary["seeds"]) == seeds
    assert set(frame.number[frame.label.isin(seeds)]) == set(range(21))  # measured first
    # The front is exactly the non-dominated completed trials.
    on_front = {r["trial"] for r in summary["front"]}
    rows = list(complete.itertuples())
    for r in rows:
        dominated = any(_dominates(o, r) for o in rows)
        assert (r.number in on_front) == (not dominated), r.number
    # Each seed is compared with the best front allocation at least as sparse.
    for label, v in summary["seeds"].items():
        assert v["front"]["sparsity"] >= v["sparsity"] - 1e-9
        assert v["front"]["fitness"] <= v["fitness"]
    # Every front config is a prune config that realizes the sparsity it claims.
    pareto = pd.read_csv(out / "pareto.csv")
    assert set(pareto.trial) == on_front and (out / "pareto.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "pareto").iterdir()) == sorted(c.split("/")[1] for c in pareto.config)
    ws = Workspace(settings, tmp_path / "ws")
    for row in pareto.itertuples():
        config = SparsityConfig.load(out / row.config)
        assert config.to_dict()["sparsity"] == json.loads((out / row.config).read_text())["sparsity"]
        alloc = np.array([config.sparsity[str(i)] for i in range(4)])
        assert ws.space.mean(alloc) == pytest.approx(row.sparsity, abs=1e-12)
        ws.realize(alloc)
        targets = ws.space.to_targets(alloc)
        for r in sparsity_table(ws.model):
            pruned = r["actual_sparsity"] * r["shape"][0] * r["shape"][1]
            assert round(pruned) == expected_pruned(tuple(r["shape"]), Target(targets[r["name"]]))
        assert row.nonzero_params == ws.nonzero_params(alloc)
    # Re-running resumes: the earlier trials are kept and no seed is measured twice.
    _run(settings, out, trials=34)
    again = pd.read_parquet(out / "trials.parquet")
    assert (again.state == "COMPLETE").sum() == 34
    np.testing.assert_array_equal(again.fitness[:28], frame.fitness)
    assert again.label.isin(seeds).sum() == 21


def test_budget_range_refuses_what_it_cannot_do(tiny_llama_dir, tiny_calib_file, tmp_path):
    for kw, match in ((dict(sampler="evo"), "evolutionary sampler keeps one budget"),
                      (dict(pruner="sparsegpt"), "level database is built for one budget"),
                      (dict(budget="sparsity=0.6:0.6"), "equal ends"),
                      (dict(budget="sparsity=0.5:0.95"), "infeasible")):
        settings = search_settings(tiny_llama_dir, tiny_calib_file, **{"budget": "sparsity=0.5:0.7", **kw})
        with pytest.raises(ValueError, match=match):
            _run(settings, tmp_path / "run", trials=2)
    with pytest.raises(ValueError, match="--predictor off"):
        _run(search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5:0.7"), tmp_path / "run", trials=2,
             guide=lambda *a: None)
    # The refused commands left the folder free for a corrected one.
    _run(search_settings(tiny_llama_dir, tiny_calib_file), tmp_path / "run", trials=6)


def test_cli_budget_range_defaults_to_nsga2_and_reports_front_against_seeds(tiny_llama_dir, tiny_calib_file, tmp_path,
                                                                            capsys):
    from predictors.features import make_spec
    from predictors.pairs import run_pairs
    from prunesearch.cli import main

    out = tmp_path / "run"
    assert main(["search", "--model", str(tiny_llama_dir), "--budget", "sparsity=0.5:0.7", "--calib",
                 str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32", "--fitness-samples", "6",
                 "--low-fidelity-samples", "2", "--min-sparsity", "0.3", "--max-sparsity", "0.9", "--trials", "18",
                 "--report-ppl", str(tiny_calib_file), "--report-limit", "4", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "uniform@0.6" in printed
    assert json.loads((out / "run_config.json").read_text())["sampler"] == "nsga2"
    assert not (out / "predictor_rounds.jsonl").exists()
    report = json.loads((out / "report.json").read_text())
    ppl = report["report_ppl"]
    assert {"front@0.5", "front@0.6", "front@0.7", "uniform@0.5", "owl@0.7"} <= set(ppl)
    assert all(v[str(tiny_calib_file)] > 1 for v in ppl.values())
    assert set(report["report_kl"]) == set(ppl)
    # The reported KL is the dense-vs-pruned KL of the allocation realized by sequential one-shot Wanda.
    from prunesearch import data
    from prunesearch.evaluate import DenseReference, windows
    from pruners.oneshot import make_pruner, prune_model

    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5:0.7"), tmp_path / "ws")
    wins = windows(data.eval_ids(ws.tokenizer, str(tiny_calib_file)), 32, 4)
    ref = DenseReference.compute(ws.model, wins)
    alloc = ws.space_at(0.7).project(np.full(4, 0.7))
    prune_model(ws.model, make_pruner("wanda"), {n: Target(v) for n, v in ws.space.to_targets(alloc).items()},
                ws.calibration_ids())
    assert report["report_kl"]["uniform@0.7"][str(tiny_calib_file)] == pytest.approx(ref.kl(ws.model), rel=1e-6)
    # Pairs of a range run train the predictor: the per-trial budget is its own feature.
    spec = make_spec()
    pairs = run_pairs(out, spec)
    target = pairs.X[:, spec["names"].index("target_sparsity")]
    assert len(pairs) == 18 and 0.5 - 1e-9 <= target.min() < target.max() <= 0.7 + 1e-9


def test_an_allocation_measured_before_is_reused_not_remeasured(tiny_llama_dir, tiny_calib_file, tmp_path,
                                                                monkeypatch):
    from search.samplers import param_name

    out = tmp_path / "run"
    settings = search_settings(tiny_llama_dir, tiny_calib_file, sampler="evo", level_step=0.1)
    _run(settings, out, trials=8)  # past the 7 seeds, so nothing is left queued
    frame = pd.read_parquet(out / "trials.parquet")
    uniform = frame[frame.label == "uniform"].iloc[0]
    # The same effective allocation asked again, from other sampled values: reused, and no forward pass.
    ws = Workspace(settings, out)
    study = open_study(settings, out, None, "prunesearch", ws.space)
    study.enqueue_trial({param_name(u): 0.9 for u in ws.space.units})  # projected to 0.6 each: uniform
    monkeypatch.setattr(Workspace, "measure", lambda *a, **k: pytest.fail("measured a known allocation again"))
    study.optimize(ws.objective, n_trials=1)
    again = study.trials[-1]
    assert again.user_attrs["duplicate_of"] == uniform.number and again.value == uniform.fitness
    # Closer than one weight per row (rows of 64 and 128 at 0.6 ± 0.001 keep 38 and 76 pruned): the same model.
    near = np.full(4, 0.6) + [0.001, -0.001, 0.0, 0.0]
    study.enqueue_trial({param_name(u): float(v) for u, v in zip(ws.space.units, near)})
    study.optimize(ws.objective, n_trials=1)
    assert study.trials[-1].user_attrs["duplicate_of"] == uniform.number
    assert ws.effective_key(near + [0.01, -0.01, 0, 0]) != ws.effective_key(near)  # 39 of 64: another model
    # The evolutionary sampler redraws children it has measured: a coarse grid, yet no repeats.
    monkeypatch.undo()
    _run(settings, out, trials=31)
    frame = pd.read_parquet(out / "trials.parquet")
    fresh = frame[frame.state.isin(["COMPLETE", "PRUNED"]) & frame.duplicate_of.isna()]
    assert len(fresh) >= 29
    assert not fresh[[f"s[{i}]" for i in range(4)]].round(9).duplicated().any()


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_statistics_through_pruned_blocks_make_the_uniform_candidate_the_sequential_one_shot_model(
        pruner, tiny_llama_dir, tiny_calib_file, tmp_path):
    """--stats-inputs pruned: the ranks (or level database) come from inputs through earlier blocks pruned at the
    budget, so the uniform candidate is exactly what ``prune`` makes; OWL's ratios still come from the dense model."""
    from pruners.oneshot import make_pruner, prune_model

    kw = {"level_step": 0.1} if pruner == "sparsegpt" else {}
    dense_ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file, pruner=pruner, stats_inputs="dense", **kw),
                         tmp_path / "d")
    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file, pruner=pruner, stats_inputs="pruned", **kw),
                   tmp_path / "p")
    assert ws.scores.outlier_ratio == pytest.approx(dense_ws.scores.outlier_ratio, rel=1e-6)
    for name, module in ws.realizer.modules.items():  # the build left the model dense
        assert torch.equal(module.weight, dense_ws.realizer.modules[name].weight)

    uniform = np.full(4, 0.6)
    targets = {n: Target(v) for n, v in ws.space.to_targets(uniform).items()}
    searched = {}
    for label, w in (("dense", dense_ws), ("pruned", ws)):
        w.realize(uniform)
        searched[label] = {n: m.weight.detach().clone() for n, m in w.realizer.modules.items()}
    ws.reset()
    prune_model(ws.model, make_pruner(pruner), targets, ws.calibration_ids())
    sequential = {n: m.weight.detach() for n, m in ws.realizer.modules.items()}
    for name in sequential:
        torch.testing.assert_close(searched["pruned"][name], sequential[name], rtol=0, atol=0)
    late = ws.lay.projections[3]  # from dense inputs, the last block's candidate is not the sequential one
    assert any(not torch.equal(searched["dense"][n], sequential[n]) for n in late)


def test_a_real_model_on_cpu_reports_on_fewer_windows():
    """The report's windows per dataset follow the effort: 256 on the built-in model and GPUs, 64 for another
    model on CPU (its report prunes and measures eight allocations)."""
    from search.settings import default_report_limit

    assert default_report_limit(True, "cpu") == 256 and default_report_limit(False, "cuda:0") == 256
    assert default_report_limit(False, "cpu") == 64
