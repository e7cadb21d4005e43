"""The budget: parsed once, and every limit of a width search counted exactly and met by every candidate."""

import json

import numpy as np
import pandas as pd
import pytest

from prunesearch.cli import main
from pruners.width.counting import flops_per_token, memory_bytes, params
from pruners.width.geometry import geometry
from pruners.width.latency import LatencyTable, measure
from search.budget import Budget
from search.width_space import make_width_space
from conftest import tiny_width_model


def test_parse_reads_units_shares_ranges_and_token_counts():
    b = Budget.parse("params=4.5M,flops=60%@512,memory=256MiB@2048,latency=0.04s")
    assert b.kinds == ("params", "flops", "memory", "latency") and b.ranged is None
    assert b.limit("params").resolve(1e9) == (4.5e6, 4.5e6)  # absolute: the dense amount does not matter
    assert b.limit("flops").resolve(2e8) == pytest.approx((1.2e8, 1.2e8)) and b.limit("flops").tokens == 512
    assert b.limit("memory").resolve(1.0) == (2.0 ** 28, 2.0 ** 28) and b.limit("memory").tokens == 2048
    assert b.limit("latency").resolve(1.0) == pytest.approx((40.0, 40.0))  # milliseconds
    r = Budget.parse("params=80%:60%").ranged
    assert r.kind == "params" and r.resolve(1000) == pytest.approx((600, 800))
    assert Budget.parse("sparsity=0.7").limit("sparsity").resolve(123) == (0.7, 0.7)


@pytest.mark.parametrize("text,message", [
    ("sparsity=0.7,params=5M", "a budget of its own"),
    ("params=5M,flops=1G@x", "@N (a positive token count)"),
    ("params=5M@512", "@N"),
    ("flops=60%:70%,params=1M:2M", "only one limit may be a range"),
    ("latency=3hours", "unknown unit"),
    ("sparsity=0,7", "not a number"),
])
def test_bad_budgets_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Budget.parse(text)


def test_several_limits_are_counted_exactly_and_every_candidate_meets_all_with_none_able_to_grow():
    model, geom, s, total = tiny_width_model()
    space = make_width_space(geom, s, "params=85%,flops=70%@64,memory=80%@512", total, 32)
    assert [c.kind for c in space.constraints] == ["params", "flops", "memory"]
    rng = np.random.default_rng(0)
    binding = set()
    for x in rng.uniform(space.low, space.high, size=(40, space.dim)):
        kept = space.project(x)
        widths = space.widths(kept)
        counted = space.amounts(kept)
        # the linear decomposition equals the whole-model counts of pruners.width.counting
        assert counted["params"] == params(s, widths)
        assert counted["flops"] == pytest.approx(flops_per_token(s, widths, 64))
        assert counted["memory"] == pytest.approx(memory_bytes(s, widths, 512)["total"])
        assert space.feasible(kept) and (kept >= 1).all() and (kept <= space.counts).all()
        for i in np.nonzero(kept < space.counts)[0]:
            grown = kept.copy()
            grown[i] += 1
            assert not space.feasible(grown)
        binding |= {c.kind for c in space.constraints if c.bound - c.cost(kept) < c.step(0, 1) + c.step(1, 1)}
    assert "flops" in binding  # 70% of the FLOPs is tighter than 85% of the parameters here


def test_latency_constraint_is_the_tables_prediction_and_measure_gives_a_consistent_table():
    model, geom, s, total = tiny_width_model()
    dense = geom.widths[0]
    table = LatencyTable(64, "cpu", 1, 40.0, 8.0, (1, 2), (6.0, 8.0),
                         tuple(range(1, dense.intermediate + 1, 7)) + (dense.intermediate,),
                         tuple(np.linspace(3.0, 8.0, len(range(1, dense.intermediate + 1, 7)) + 1)))
    space = make_width_space(geom, s, "latency=75%", total, 32, lambda tokens: table)
    c = space.constraint("latency")
    assert c.dense == 40.0 and c.bound == pytest.approx(30.0)
    assert c.cost(space.kept(geom.widths)) == pytest.approx(40.0)
    rng = np.random.default_rng(1)
    for x in rng.uniform(space.low, space.high, size=(20, space.dim)):
        kept = space.project(x)
        assert c.cost(kept) == pytest.approx(table.predict(space.widths(kept)))
        assert c.cost(kept) <= 30.0 + 1e-9
    measured = measure(model, geom, 16, reps=1)
    assert measured.groups == (1, 2) and measured.channels[-1] == dense.intermediate
    assert measured.predict(geom.widths) == pytest.approx(measured.dense_ms)
    assert min(measured.attention_ms + measured.mlp_ms + (measured.dense_ms, measured.block_ms)) > 0


def _argv(model_dir, calib, out, budget, *extra):
    return ["search", "--space", "width", "--model", str(model_dir), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--fitness-samples", "6", "--low-fidelity-samples", "2", "--device", "cpu",
            "--report-ppl=", "--quiet", "--budget", budget, "--out", str(out), *extra]


def test_width_search_under_params_and_latency_keeps_every_trial_inside_both(tiny_llama_dir, tiny_calib_file,
                                                                              tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    total = sum(p.numel() for p in model.parameters())
    dense = geometry(model).widths[0]
    # a table "measured on the serving device": block latency linear in groups and channels (ms)
    channels = (1, dense.intermediate // 2, dense.intermediate)
    table = LatencyTable(32, "phone", 4, 10.0, 2.0, (1, 2), (1.5, 2.0), channels, (1.0, 1.5, 2.0))
    table.save(tmp_path / "table.json")
    out = tmp_path / "run"
    assert main(_argv(tiny_llama_dir, tiny_calib_file, out, "params=90%,latency=8ms@32", "--trials", "8",
                      "--latency-table", str(tmp_path / "table.json"))) == 0
    frame = pd.read_parquet(out / "trials.parquet")
    done = frame[frame.state == "COMPLETE"]
    best = json.loads((out / "best_config.json").read_text())["meta"]
    assert len(done) >= 4 and (done["params"] <= 0.9 * total).all() and (done["latency"] <= 8.0 + 1e-9).all()
    assert (done["latency"] > 7.5).any()  # the latency limit binds: 8 ms of 10 is tighter than 90% of parameters
    assert best["budget_counts"]["params"] == best["params"] and len(best["budget_limits"]) == 2
    bad = tmp_path / "bad.json"
    LatencyTable(64, "phone", 4, 10.0, 2.0, (1, 2), (1.5, 2.0), channels, (1.0, 1.5, 2.0)).save(bad)
    assert main(_argv(tiny_llama_dir, tiny_calib_file, tmp_path / "r2", "latency=8ms@32", "--trials", "2",
                      "--latency-table", str(bad))) == 2


def test_a_budget_range_on_flops_searches_a_front_of_fitness_against_flops_saved(tiny_llama_dir, tiny_calib_file,
                                                                                 tmp_path):
    out = tmp_path / "front"
    assert main(_argv(tiny_llama_dir, tiny_calib_file, out, "flops=60%:90%", "--trials", "14")) == 0
    front = pd.read_csv(out / "pareto.csv")
    frame = pd.read_parquet(out / "trials.parquet")
    done = frame[frame.state == "COMPLETE"]
    assert len(front) >= 2 and done.label.str.contains("@").sum() >= 6  # 2 seeds at 3 budget levels
    saved = done.budget_sparsity.to_numpy()
    # every trial meets its own level's limit, so saves at least 10%; at most 40% plus what whole units overshoot
    assert saved.min() >= 0.1 - 1e-9 and 0.4 <= saved.max() < 0.41
    for _, row in front.iterrows():  # nothing measured is better on both objectives than a front point
        assert not ((done.fitness < row.fitness - 1e-12) & (done.budget_sparsity > row.sparsity + 1e-12)).any()
