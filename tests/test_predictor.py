"""The accuracy predictor: features, the boosted-tree ensemble, rank metrics, guided search and retraining."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import interrupt_objective_at, search_settings
from predictors.features import SpaceRecord, depth_weights, features, make_spec
from predictors.metrics import cross_validate, ranking_metrics, top_precision
from predictors.model import FitnessPredictor
from prunesearch.cli import main
from search.engine import Workspace, run_search
from search.guided import Guide, GuideConfig
from search.screening import narrow
from search.space import Space

SPEC = make_spec(8)


def _record(num_blocks: int = 6, target: float = 0.7, outliers=None) -> SpaceRecord:
    """Block units of 100 weights, 40 of them attention."""
    return SpaceRecord(tuple(str(i) for i in range(num_blocks)), tuple(range(num_blocks)), (100.0,) * num_blocks,
                       (40.0,) * num_blocks, num_blocks, target, 0.5, 0.9,
                       tuple(outliers or [1.0 + i for i in range(num_blocks)]), "m", f"sparsity={target}", "block",
                       "kl")


def _space(n: int = 6, target: float = 0.7, sizes=None) -> Space:
    sizes = np.asarray(sizes if sizes is not None else [100.0] * n, dtype=np.float64)
    return Space(tuple(str(i) for i in range(n)), sizes, target, 0.5, 0.9, tuple((str(i),) for i in range(n)),
                 tuple(range(n)))


def test_features_of_a_uniform_allocation():
    rec = _record()
    f = dict(zip(SPEC["names"], features(np.full((1, 6), 0.7), rec, SPEC)[0]))
    for b in range(8):
        assert f[f"depth[{b}]"] == pytest.approx(0.7, abs=1e-12)
        assert f[f"attn_minus_mlp[{b}]"] == 0.0
    assert f["mean"] == pytest.approx(0.7, abs=1e-12)
    for name in ("std", "slope", "curvature", "owl_covariance"):
        assert f[name] == pytest.approx(0.0, abs=1e-12)
    for name in ("min", "max", "first", "last", "attention_mean", "mlp_mean", "target_sparsity"):
        assert f[name] == pytest.approx(0.7, abs=1e-12)
    assert f["attention_share"] == pytest.approx(0.4, abs=1e-12)  # 40 of every 100 weights are attention
    assert f["owl_weighted"] == pytest.approx(0.7, abs=1e-12)  # outliers normalized to mean 1
    # outlier ratios 1..6 (mean 3.5) resampled to 8 bins: bin 0 covers 3/4 of block 0 → 1/3.5
    assert f["outliers[0]"] == pytest.approx(1 / 3.5)
    assert f["outliers[1]"] == pytest.approx((0.25 * 1 + 0.5 * 2) / 0.75 / 3.5)


def test_features_follow_relative_depth_across_model_depths():
    """A linear depth profile gives the same slope and the same depth bins on 4 and on 12 blocks."""
    def ramp(n):
        return 0.7 + 0.2 * ((np.arange(n) + 0.5) / n - 0.5)

    f4 = dict(zip(SPEC["names"], features(ramp(4)[None], _record(4), SPEC)[0]))
    f16 = dict(zip(SPEC["names"], features(ramp(16)[None], _record(16), SPEC)[0]))
    assert f4["slope"] == pytest.approx(0.2) and f16["slope"] == pytest.approx(0.2)
    assert f4["curvature"] == pytest.approx(0.0, abs=1e-12)
    for b in range(8):  # 16 blocks resample exactly onto 8 bins: means of block pairs, i.e. the bin centres
        assert f16[f"depth[{b}]"] == pytest.approx(0.7 + 0.2 * ((b + 0.5) / 8 - 0.5))
    np.testing.assert_allclose(depth_weights(6, 8).sum(axis=1), 1.0)


def _smooth(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 4))
    return X, np.exp(2 * (X[:, 0] - 0.3) ** 2 + (X[:, 1] - 0.6) ** 2 + 0.5 * X[:, 2])


def test_save_load_reproduces_predictions_bit_exactly(tmp_path):
    X, y = _smooth(60)
    for kw in ({}, {"target": "rank"}, {"objective": "pairwise"}):
        model = FitnessPredictor(n_members=3, n_estimators=40, **kw).fit(X, y)
        model.save(tmp_path / "p", SPEC, {"pairs": 60}, {"kendall_tau": 1.0})
        loaded, meta = FitnessPredictor.load(tmp_path / "p")
        a, sa = model.predict(X, return_std=True)
        b, sb = loaded.predict(X, return_std=True)
        assert np.array_equal(a, b) and np.array_equal(sa, sb)
        assert loaded.get_params() == model.get_params()
        assert meta["feature_spec"] == SPEC and meta["training"] == {"pairs": 60}
        assert {"xgboost", "scikit-learn"} <= set(meta["versions"])
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "member-0.json", "member-1.json", "member-2.json", "predictor.json"]


def test_predictor_ranks_a_known_smooth_function():
    X, y = _smooth(300)
    model = FitnessPredictor(n_members=4, n_estimators=150, learning_rate=0.1).fit(X[:200], y[:200])
    mean, std = model.predict(X[200:], return_std=True)
    m = ranking_metrics(y[200:], mean)
    assert m["kendall_tau"] > 0.9
    assert std.shape == (100,) and np.all(std >= 0) and std.max() > 0
    assert FitnessPredictor().get_params()["n_members"] == 8


def test_the_lower_bound_is_taken_on_the_log_scale_so_a_heavy_tailed_fitness_keeps_its_order():
    # perplexity-like fitness: exp of a smooth function spanning 300 to ~20,000, as SmolLM2's 70% candidates do,
    # and few pairs (30), as in the guided search's early rounds, where the members disagree most
    X, y = _smooth(530)
    ppl = np.exp(5.7 + 4.2 * (y - y.min()) / np.ptp(y))
    model = FitnessPredictor(n_members=8, n_estimators=150, learning_rate=0.1).fit(X[:30], ppl[:30])
    logs = np.log(model.member_predictions(X[30:]))
    bound = model.lower_bound(X[30:], kappa=1.0)
    np.testing.assert_allclose(bound, np.exp(logs.mean(axis=0) - logs.std(axis=0)), rtol=1e-12)
    mean, std = model.predict(X[30:], return_std=True)
    assert np.all(bound > 0) and np.all(bound <= mean)
    assert (std / mean).max() > 0.5  # in fitness units the spread rivals the mean ...
    # ... so mean - std ranks the held-out points worse than the bound on the members' own scale
    on_log, on_fitness = (ranking_metrics(ppl[30:], s)["kendall_tau"] for s in (bound, mean - std))
    assert on_log > on_fitness + 0.02 and on_log > 0.8


def test_metrics_on_known_values():
    y = np.arange(10.0)
    m = ranking_metrics(y, y[::-1])
    assert m["kendall_tau"] == pytest.approx(-1.0) and m["spearman"] == pytest.approx(-1.0)
    assert m["top10_precision"] == 0.0
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - y[::-1]) ** 2)))
    assert top_precision(np.arange(20.0), np.array([1, 0] + list(range(2, 20)), dtype=float)) == 1.0
    X, yy = _smooth(40)
    metrics, pred = cross_validate(FitnessPredictor(n_members=1, n_estimators=30), X, yy, k=4)
    assert metrics["n"] == 40 and metrics["folds"] == 4 and pred.shape == (40,)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.05, 0.5), st.floats(0.0, 0.8))
def test_narrowing_never_excludes_the_incumbent(n, seed, quantile, insensitive):
    rng = np.random.default_rng(seed)
    space = _space(n, 0.7, rng.uniform(50, 150, n))
    screened = space.project(rng.uniform(space.low, space.high, (300, n)))
    np.testing.assert_allclose(screened @ space.sizes / space.sizes.sum(), 0.7, atol=1e-9)
    predicted = rng.normal(size=300) + screened[:, 0]
    incumbent = space.project(rng.uniform(space.low, space.high, n))
    low, high, sens = narrow(space, screened, predicted, incumbent, quantile, insensitive)
    assert np.all(low <= incumbent) and np.all(incumbent <= high)
    assert np.all(low >= space.low) and np.all(high <= space.high) and np.all(low < high)
    assert sens.shape == (n,)
    top = screened[np.argsort(predicted)[: max(2, int(np.ceil(quantile * 300)))]]
    median = np.median(top, axis=0)
    assert np.all(low <= median + 1e-12) and np.all(median <= high + 1e-12)


def test_batched_projection_matches_row_by_row():
    space = _space(5, 0.7, [10.0, 20.0, 30.0, 40.0, 50.0])
    x = np.random.default_rng(1).uniform(0.3, 1.0, (50, 5))
    np.testing.assert_allclose(space.project(x), np.array([space.project(r) for r in x]), atol=1e-9)


# --- guided search and retraining on a tiny model ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


FAST = dict(warmup=8, screen=500, local=0.5, batch=8, screen_top=4, measure=3, members=3, trees=30)


def _guided(settings, out, trials, **kw):
    return run_search(settings, out, trials=trials, report_ppl=(), progress=False,
                      guide=Guide(GuideConfig(**{**FAST, **kw})))


@pytest.fixture(scope="module")
def guided_runs(tiny_llama_dir, tiny_calib_file, tmp_path_factory):
    """Two guided runs of the same study setup (different seeds of calibration) and one of another budget."""
    base = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNESEARCH_CACHE", str(base / "cache"))
    a, b, c = base / "a", base / "b", base / "c"
    _guided(search_settings(tiny_llama_dir, tiny_calib_file), a, 14)
    _guided(search_settings(tiny_llama_dir, tiny_calib_file, seed=1), b, 11)
    run_search(search_settings(tiny_llama_dir, tiny_calib_file, budget="params=100K"), c, trials=6, report_ppl=(),
               progress=False)
    mp.undo()
    return a, b, c


def test_guided_run_writes_rounds_and_measures_fewer_than_it_screens(guided_runs):
    a, _, _ = guided_runs
    frame = pd.read_parquet(a / "trials.parquet")
    finished = frame[frame.state.isin(["COMPLETE", "PRUNED"])]
    assert len(finished) == 14
    rounds = [json.loads(line) for line in (a / "predictor_rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2  # 8 warm-up trials, then rounds of 3
    guided = frame[frame.guide.fillna("").str.startswith("round-")]
    assert len(guided) == 6 and (guided.state == "COMPLETE").all()  # predictor-chosen: full fidelity
    assert (frame.guide == "warmup").sum() == 1  # 7 seeds + 1 Sobol point
    for r in rounds:
        counts = r["screened"]
        candidates = counts["sampler_candidates"] + counts["screen_candidates"]
        assert counts["measured"] == 3 < candidates == counts["measured"] + counts["screened_out"]
        assert counts["narrowing_samples"] == counts["local_samples"] == 250
        assert counts["smooth_samples"] == 0  # one unit per block: the box is screened as it is
        assert r["incumbent"]["inside_bounds"]
        assert all(0.3 <= lo < hi <= 0.9 for lo, hi in zip(r["bounds"]["low"], r["bounds"]["high"]))
        assert r["cv"]["n"] == r["train_pairs"]
    assert rounds[1]["prospective"]["n"] == 3  # round 0's picks were predicted before being measured
    complete = frame[frame.state == "COMPLETE"]
    np.testing.assert_allclose(complete.budget_sparsity, 0.6, atol=1e-9)
    s = complete[[f"s[{u}]" for u in range(4)]].to_numpy()
    np.testing.assert_allclose(s.mean(axis=1), 0.6, atol=1e-9)  # equal-size blocks: the plain mean is the budget
    meta = json.loads((a / "predictor" / "predictor.json").read_text())
    assert meta["training"]["pairs"] == len(complete) and meta["metrics"]["folds"] == 5


def test_guided_run_resumes(tiny_llama_dir, tiny_calib_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = search_settings(tiny_llama_dir, tiny_calib_file)
    original = interrupt_objective_at(monkeypatch, 10)  # the second pick of round 0
    assert _guided(settings, out, 11)["interrupted"]
    monkeypatch.setattr(Workspace, "objective", original)
    assert len(pd.read_parquet(out / "trials.parquet").query("state == 'COMPLETE'")) == 9
    _guided(settings, out, 11)  # measures round 0's queued third pick, then one pick of round 1
    resumed = [json.loads(line) for line in (out / "predictor_rounds.jsonl").read_text().splitlines()]
    assert [r["screened"]["measured"] for r in resumed] == [3, 1]
    first = pd.read_parquet(out / "trials.parquet")
    rounds_before = (out / "predictor_rounds.jsonl").read_text().splitlines()
    _guided(settings, out, 17)
    second = pd.read_parquet(out / "trials.parquet")
    rounds_after = (out / "predictor_rounds.jsonl").read_text().splitlines()
    assert len(second[second.state.isin(["COMPLETE", "PRUNED"])]) == 17
    assert rounds_after[: len(rounds_before)] == rounds_before and len(rounds_after) == len(rounds_before) + 2
    merged = first.merge(second, on="number", suffixes=("_a", "_b"))
    assert len(merged) == len(first)
    np.testing.assert_array_equal(merged.fitness_a.fillna(-1), merged.fitness_b.fillna(-1))  # kept, not redone
    assert (second.guide == "warmup").sum() == 1  # 7 seeds + 1 Sobol point
    xs = second[[c for c in second.columns if c.startswith("x[")]].round(12)
    assert not xs.duplicated().any()


def test_retrain_uses_the_union_of_runs_and_evaluate_scores_a_run(guided_runs, tmp_path, capsys):
    a, b, _ = guided_runs
    n_a = (pd.read_parquet(a / "trials.parquet").state == "COMPLETE").sum()
    n_b = (pd.read_parquet(b / "trials.parquet").state == "COMPLETE").sum()
    out = tmp_path / "pred"
    pairs_file = tmp_path / "pairs.parquet"
    assert main(["predictor", "retrain", "--from", str(a), "--from", str(b), "--out", str(out), "--members", "2",
                 "--folds", "3", "--export-pairs", str(pairs_file)]) == 0
    printed = capsys.readouterr().out
    assert "kendall_tau" in printed and f"trained on {n_a + n_b} pairs from 2 run(s)" in printed
    meta = json.loads((out / "predictor.json").read_text())
    assert meta["training"]["pairs"] == n_a + n_b and meta["training"]["runs"] == [str(a), str(b)]
    assert len(pd.read_parquet(pairs_file)) == n_a + n_b
    # the exported pairs plus run a again: the union counts both
    assert main(["predictor", "retrain", "--from", str(a), "--pairs", str(pairs_file), "--out", str(out),
                 "--overwrite", "--members", "2", "--folds", "3"]) == 0
    assert json.loads((out / "predictor.json").read_text())["training"]["pairs"] == 2 * n_a + n_b
    capsys.readouterr()
    assert main(["predictor", "evaluate", "--predictor", str(a / "predictor"), "--on", str(b)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["held-out", "run", str(n_b)]
    assert -1.0 <= float(row[3]) <= 1.0


def test_warm_start_from_a_retrained_predictor(guided_runs, tiny_llama_dir, tiny_calib_file, tmp_path):
    a, _, _ = guided_runs
    out = tmp_path / "warm"
    _guided(search_settings(tiny_llama_dir, tiny_calib_file, seed=2), out, 11, init=str(a / "predictor"))
    frame = pd.read_parquet(out / "trials.parquet")
    assert (frame.guide == "warmup").sum() == 0  # the seeds are the only warm-up
    rounds = [json.loads(line) for line in (out / "predictor_rounds.jsonl").read_text().splitlines()]
    assert [r["predictor"] for r in rounds] == ["init", "own"]  # own once 8 pairs (the warm-up) are measured


def test_bad_predictor_input_is_a_clear_error(guided_runs, tmp_path, capsys):
    a, _, c = guided_runs
    out = tmp_path / "pred"

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "different budget kinds" in error(["predictor", "retrain", "--from", str(a), "--from", str(c),
                                              "--out", str(out), "--folds", "2"])
    assert not out.exists()
    assert main(["predictor", "retrain", "--from", str(a), "--from", str(c), "--out", str(out), "--folds", "2",
                 "--members", "1", "--allow-mixed"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no trials.parquet" in error(["predictor", "retrain", "--from", str(empty), "--out", str(tmp_path / "x")])
    assert "no pairs given" in error(["predictor", "retrain", "--out", str(tmp_path / "y")])
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    frame = pd.read_parquet(a / "trials.parquet")
    frame.assign(state="FAIL").to_parquet(nothing / "trials.parquet")
    (nothing / "space.json").write_text((a / "space.json").read_text())
    assert "no completed trials" in error(["predictor", "retrain", "--from", str(nothing), "--out",
                                           str(tmp_path / "z")])
    meta = json.loads((a / "predictor" / "predictor.json").read_text())
    meta["feature_spec"]["depth_bins"] = 4
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (a / "predictor").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "predictor.json").write_text(json.dumps(meta))
    assert "feature spec mismatch" in error(["predictor", "evaluate", "--predictor", str(bad), "--on", str(a)])
    assert "different budget kinds" in error(["predictor", "evaluate", "--predictor", str(a / "predictor"),
                                              "--on", str(c)])
    assert "--predictor-init needs --predictor on" in error(["search", "--predictor", "off", "--predictor-init",
                                                             str(a / "predictor"), "--out", str(tmp_path / "s")])
