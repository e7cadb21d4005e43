"""``--realize-top K`` (``search.realized``): allocations entering the K best by search fitness are pruned for real and
re-scored; the guided search's local moves and incumbent come from the best realized ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import FAMILIES, saved_tiny_model, search_settings
from prunesearch.cli import main
from search.engine import Selection, Workspace, run_search
from search.guided import Guide, GuideConfig
from test_predictor import FAST


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def test_the_best_realized_allocations_lead_the_guided_search(tiny_llama_dir, tiny_calib_file, tmp_path):
    settings = search_settings(tiny_llama_dir, tiny_calib_file)
    out = tmp_path / "run"
    summary = run_search(settings, out, trials=17, report_ppl=(), progress=False, selection=Selection(2, 3),
                         guide=Guide(GuideConfig(**FAST, realize=2)))
    frame = pd.read_parquet(out / "trials.parquet").set_index("number")
    realized = json.loads((out / "realized.json").read_text())["scores"]
    rounds = [json.loads(line) for line in (out / "predictor_rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3
    seen: set[int] = set()
    for r in rounds:
        # what each round realized: the 2 best distinct trials by search fitness finished before it, not realized yet
        before = frame[(frame.index < r["finished_before"]) & (frame.state == "COMPLETE") & frame.duplicate_of.isna()]
        top2 = set(before.fitness.nsmallest(2).index)
        assert set(r["realized"]["measured"]) == top2 - seen
        seen |= top2
        # the parents: every realized trial so far, best realized first, then the best remaining by search fitness
        known = sorted(seen, key=lambda k: realized[str(k)]["fitness"])
        rest = [k for k in before.fitness.sort_values().index if k not in seen]
        assert r["parents"] == (known + rest)[:3]
        assert r["incumbent"]["trial"] == r["parents"][0]
    assert set(map(int, realized)) == seen

    # one realized score by hand: pruned sequentially on the calibration, KL on the search's own fitness windows
    ws = Workspace(settings, tmp_path / "ws")
    k = min(seen, key=lambda n: realized[str(n)]["fitness"])
    ws.prune_for_report(np.asarray(frame.loc[k, [f"s[{u}]" for u in ws.space.units]], dtype=float),
                        ws.calibration_ids())
    value = ws.fitness.value(*ws.fitness.partial(ws.model, 0, ws.heldout.shape[0]))
    assert value == pytest.approx(realized[str(k)]["fitness"], rel=1e-5)
    assert realized[str(k)]["search_fitness"] == pytest.approx(frame.loc[k, "fitness"])
    assert value != pytest.approx(frame.loc[k, "fitness"], rel=1e-3)  # realized is not the proxy

    # the final selection re-measures the best realized allocations beside the search's 2 best
    finalists = [row["trial"] for row in summary["selection"]["finalists"]]
    best_realized = sorted(seen, key=lambda n: realized[str(n)]["fitness"])[:3]
    assert set(best_realized) <= set(finalists)
    assert finalists[:2] == list(frame[(frame.state == "COMPLETE") & frame.duplicate_of.isna()]
                                 .fitness.nsmallest(2).index)

    # resuming with more trials realizes nothing twice
    run_search(settings, out, trials=20, report_ppl=(), progress=False, selection=Selection(2, 3),
               guide=Guide(GuideConfig(**FAST, realize=2)))
    again = json.loads((out / "realized.json").read_text())["scores"]
    assert {n: again[n] for n in realized} == realized


def test_realize_top_needs_the_guided_search_and_a_count(capsys, tmp_path):
    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    assert "--realize-top must be 0 (off) or more" in error(["search", "--realize-top", "-1", "--out",
                                                            str(tmp_path / "a")])
    assert "--realize-top needs --predictor on" in error(["search", "--predictor", "off", "--realize-top", "2",
                                                          "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_realize_top_on_every_family(family, tmp_path, tiny_tokenizer, tiny_calib_file):
    model_dir = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    out = tmp_path / "run"
    summary = run_search(search_settings(model_dir, tiny_calib_file), out, trials=12, report_ppl=(), progress=False,
                         selection=Selection(2, 3), guide=Guide(GuideConfig(**FAST, realize=2)))
    realized = json.loads((out / "realized.json").read_text())["scores"]
    assert len(realized) >= 2 and all(np.isfinite(v["fitness"]) and v["fitness"] > 0 for v in realized.values())
    best = min(realized, key=lambda k: realized[k]["fitness"])
    assert int(best) in [row["trial"] for row in summary["selection"]["finalists"]]
