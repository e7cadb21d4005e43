"""The final selection (``search.selection``): the best few allocations pruned for real and re-measured on fresh
held-out windows; the lowest there is the run's answer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAMILIES, saved_tiny_model, search_settings
from prunesearch import data
from prunesearch.evaluate import DenseReference
from search.engine import Selection, Workspace, run_search
from search.selection import finalists


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def test_the_answer_is_the_finalist_closest_to_dense_when_pruned_for_real(tiny_llama_dir, tiny_calib_file, tmp_path):
    settings = search_settings(tiny_llama_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1)
    out = tmp_path / "run"
    summary = run_search(settings, out, trials=14, report_ppl=(), progress=False, selection=Selection(3, 5))
    frame = pd.read_parquet(out / "trials.parquet")
    distinct = frame[(frame.state == "COMPLETE") & frame.duplicate_of.isna()].sort_values("fitness")
    sel = summary["selection"]
    assert [r["trial"] for r in sel["finalists"]] == distinct.number.head(3).tolist()
    assert sel["chosen"] == min(sel["finalists"], key=lambda r: r["selection_fitness"])["trial"]
    assert summary["best"]["trial"] == sel["chosen"]
    assert json.loads((out / "best_config.json").read_text())["meta"]["trial"] == sel["chosen"]
    page = (out / "report.html").read_text()
    assert "Final selection" in page and f"trial {sel['chosen']})" in page

    # recompute one finalist by hand: pruned sequentially, KL on held-out windows 6-10 (the fitness used 0-5)
    ws = Workspace(settings, tmp_path / "ws")
    ids = data.heldout_ids(ws.tokenizer, 11, ws.seqlen, 0, None)
    assert torch.equal(ids[:6], ws.heldout)
    reference = DenseReference.compute(ws.model, ids[6:], 8)
    row = sel["finalists"][1]
    alloc = np.asarray(distinct.loc[distinct.number == row["trial"], [f"s[{u}]" for u in ws.space.units]])[0]
    ws.prune_for_report(alloc, ws.calibration_ids())
    assert reference.kl(ws.model, 8) == pytest.approx(row["selection_fitness"], rel=1e-5)
    assert row["selection_fitness"] != pytest.approx(row["search_fitness"], rel=1e-3)  # other windows, realized

    # finishing the run again re-uses the measured finalists; one more finalist is measured, the rest kept
    before = json.loads((out / "selection.json").read_text())["scores"]
    again = run_search(settings, out, trials=14, report_ppl=(), progress=False, selection=Selection(4, 5))
    after = json.loads((out / "selection.json").read_text())["scores"]
    assert {k: after[k] for k in before} == before and len(after) == 4
    assert [r["trial"] for r in again["selection"]["finalists"]][:3] == [r["trial"] for r in sel["finalists"]]


def test_no_selection_keeps_the_best_search_fitness(tiny_llama_dir, tiny_calib_file, tmp_path):
    out = tmp_path / "run"
    summary = run_search(search_settings(tiny_llama_dir, tiny_calib_file), out, trials=9, report_ppl=(),
                         progress=False, selection=Selection(0, 5))
    frame = pd.read_parquet(out / "trials.parquet")
    assert "selection" not in summary and not (out / "selection.json").exists()
    assert summary["best"]["fitness"] == frame.fitness.min()


@pytest.mark.parametrize("family", FAMILIES)
def test_final_selection_on_every_family(family, tmp_path, tiny_tokenizer, tiny_calib_file):
    model_dir = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    out = tmp_path / "run"
    summary = run_search(search_settings(model_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1), out,
                         trials=9, report_ppl=(), progress=False, selection=Selection(2, 3))
    rows = summary["selection"]["finalists"]
    assert len(rows) == 2 and all(np.isfinite(r["selection_fitness"]) and r["selection_fitness"] > 0 for r in rows)
    assert summary["best"]["trial"] == min(rows, key=lambda r: r["selection_fitness"])["trial"]


def test_an_enqueued_start_is_always_a_finalist(tiny_llama_dir, tiny_calib_file, tmp_path):
    # a poor start (the deep blocks spared, the first ones pruned hardest) is re-measured beside the search's best
    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file), tmp_path / "ws")
    n = len(ws.space.units)
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"sparsity": {u: 0.9 - 0.6 * i / (n - 1) for i, u in enumerate(ws.space.units)},
                                 "pattern": "unstructured"}))
    out = tmp_path / "run"
    summary = run_search(search_settings(tiny_llama_dir, tiny_calib_file, enqueue=[str(start)]), out, trials=12,
                         report_ppl=(), progress=False, selection=Selection(2, 5))
    frame = pd.read_parquet(out / "trials.parquet")
    distinct = frame[(frame.state == "COMPLETE") & frame.duplicate_of.isna()].sort_values("fitness")
    start_trial = int(frame.number[frame.label == "start:start.json"].iloc[0])
    assert start_trial not in distinct.number.head(2).tolist()  # not among the best two by search fitness
    rows = summary["selection"]["finalists"]
    assert [r["trial"] for r in rows] == [*distinct.number.head(2).tolist(), start_trial]
    assert rows[2]["label"] == "start:start.json" and np.isfinite(rows[2]["selection_fitness"])
    assert summary["best"]["trial"] == min(rows, key=lambda r: r["selection_fitness"])["trial"]


def test_a_start_equal_to_an_earlier_trial_brings_that_trial_in():
    def trial(number, value, **attrs):
        return SimpleNamespace(number=number, value=value, user_attrs=attrs)

    complete = [trial(0, 3.0, seed="uniform"), trial(1, 1.0), trial(2, 2.0),
                trial(3, 3.0, seed="start:best_config.json", duplicate_of=0)]
    assert [t.number for t in finalists(complete, 2)] == [1, 2, 0]
    assert [t.number for t in finalists(complete, 3)] == [1, 2, 0]
