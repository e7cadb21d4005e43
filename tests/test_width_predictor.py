"""The accuracy predictor on width runs: features of kept groups and channels over relative depth, the guided
search on ``--space width`` (every pick on the budget), and retraining and scoring on width runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import search_settings, tiny_width_model
from predictors.features import features, load_record, make_spec
from predictors.width_features import WidthRecord
from prunesearch.cli import main
from prunesearch.safety import UserError
from search.engine import run_search
from search.guided import Guide, GuideConfig
from search.width_space import make_width_space

SPEC = make_spec(8, "width")
FAST = dict(warmup=6, screen=500, local=0.5, batch=8, screen_top=4, measure=3, members=3, trees=30)


def _record(blocks: int, groups: int = 3, channels: int = 96) -> WidthRecord:
    units = tuple(f"{i}.{k}" for i in range(blocks) for k in ("attn", "mlp"))
    return WidthRecord(units, tuple(i for i in range(blocks) for _ in range(2)), (groups, channels) * blocks,
                       (400, 30) * blocks, 3, 1000, 0, "params=70%", None, (), 0.1, 1.0, "m", "kl", "flap")


def _kept(rec: WidthRecord, attn: np.ndarray, mlp: np.ndarray) -> np.ndarray:
    counts = np.asarray(rec.counts, dtype=np.float64).reshape(-1, 2)
    return np.stack([attn * counts[:, 0], mlp * counts[:, 1]], axis=1).reshape(1, -1)


def test_width_features_of_uniform_and_ramped_widths():
    rec = _record(6)
    f = dict(zip(SPEC["names"], features(_kept(rec, np.full(6, 2 / 3), np.full(6, 0.5)), rec, SPEC)[0]))
    for b in range(8):
        assert f[f"attn_kept[{b}]"] == pytest.approx(2 / 3) and f[f"mlp_kept[{b}]"] == pytest.approx(0.5)
    kept = (2 / 3 * 1200 + 0.5 * 2880) / (1200 + 2880)  # per block: 3 groups × 400, 96 channels × 30
    assert f["kept_params"] == pytest.approx(kept)
    assert f["attention_share"] == pytest.approx(800 / (800 + 1440))
    assert f["kept_std"] == pytest.approx(0.0, abs=1e-12) and f["kept_slope"] == pytest.approx(0.0, abs=1e-12)
    assert (f["attn_min"], f["mlp_first"], f["mlp_last"]) == pytest.approx((2 / 3, 0.5, 0.5))

    def ramp(blocks):  # MLP share rising with relative depth, attention constant
        r = _record(blocks)
        depth = (np.arange(blocks) + 0.5) / blocks
        return dict(zip(SPEC["names"], features(_kept(r, np.ones(blocks), 0.2 + 0.6 * depth), r, SPEC)[0]))

    shallow, deep = ramp(4), ramp(12)
    assert shallow["kept_slope"] > 0.3
    assert shallow["kept_slope"] == pytest.approx(deep["kept_slope"], rel=1e-9)  # relative depth: same trend
    assert shallow["mlp_kept[7]"] > shallow["mlp_kept[0]"]
    assert shallow["mlp_kept[0]"] == pytest.approx(0.2 + 0.6 * 0.125)  # bin 0 = half of block 0 of 4
    with pytest.raises(UserError, match="width run's allocations do not have the features of sparsity"):
        features(_kept(rec, np.ones(6), np.ones(6)), rec, make_spec(8))


def test_screening_projection_is_the_unrounded_projection_and_meets_every_limit():
    _model, geom, s, total = tiny_width_model()
    space = make_width_space(geom, s, "params=70%,flops=80%", total, 32)
    x = np.random.default_rng(0).uniform(space.low, space.high, size=(200, space.dim))
    many = space.project_many(x)
    np.testing.assert_allclose(many, np.stack([space._real(row) for row in x]), rtol=0, atol=1e-6)
    for c in space.constraints:
        assert (c.cost_many(many) <= c.bound * (1 + 1e-9)).all()
    whole = np.stack([space.project(row) for row in x])  # rounded to whole groups and channels, then grown
    assert np.abs(whole @ space.costs - many @ space.costs).max() < s.channel_params()
    np.testing.assert_allclose(space.sampled(whole), whole / space.counts)


def test_guided_width_search_measures_picks_on_the_budget_and_retrains(tiny_llama_dir, tiny_calib_file, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    settings = search_settings(tiny_llama_dir, tiny_calib_file, space="width", budget="params=75%",
                               min_sparsity=None, max_sparsity=None)
    run_search(settings, run, trials=12, report_ppl=(), progress=False, guide=Guide(GuideConfig(**FAST)))
    frame = pd.read_parquet(run / "trials.parquet")
    done = frame[frame.state == "COMPLETE"]
    rounds = [json.loads(line) for line in (run / "predictor_rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and len(frame) == 12
    for r in rounds:  # two units per block: half the rest of the screen is evolution children, half the box smooth
        assert (r["screened"]["local_samples"], r["screened"]["smooth_samples"]) == (375, 62)
    guided = frame[frame.guide.fillna("").str.startswith("round-")]
    assert len(guided) == 6 and (guided.state == "COMPLETE").all()
    assert guided.duplicate_of.isna().all()  # a pick that rounds to a measured allocation is never enqueued
    rec = load_record(run / "space.json")
    budget = rec.budget_params
    _model, _geom, s, _total = tiny_width_model()
    assert (done.nonzero_params <= budget).all() and (budget - done.nonzero_params < s.channel_params()).all()
    meta = json.loads((run / "predictor" / "predictor.json").read_text())
    measured = done[done.duplicate_of.isna()]  # a pick that rounds to a measured allocation reuses its fitness
    assert meta["feature_spec"]["space"] == "width" and meta["training"]["pairs"] == len(measured)

    out = tmp_path / "retrained"
    assert main(["predictor", "retrain", "--from", str(run), "--out", str(out), "--folds", "3"]) == 0
    assert json.loads((out / "predictor.json").read_text())["feature_spec"] == SPEC
    assert main(["predictor", "evaluate", "--predictor", str(out), "--on", str(run)]) == 0
    assert "part of this predictor's training data" in capsys.readouterr().out

    sparsity_run = tmp_path / "sparsity"
    run_search(search_settings(tiny_llama_dir, tiny_calib_file), sparsity_run, trials=8, report_ppl=(),
               progress=False, guide=Guide(GuideConfig(**FAST)))
    assert main(["predictor", "evaluate", "--predictor", str(out), "--on", str(sparsity_run)]) == 2
    assert "is a sparsity run; these features describe width allocations" in capsys.readouterr().err
    assert main(["predictor", "retrain", "--from", str(run), "--from", str(sparsity_run), "--out",
                 str(tmp_path / "mixed")]) == 2
    assert "pairs come from sparsity and width searches" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
