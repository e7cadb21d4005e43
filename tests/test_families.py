"""Search, then realize the best allocation, on every supported family and with every search pruner, through the
command line as a user runs it (GPT-2's Conv1D and GPT-NeoX's fused query_key_value included)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import saved_tiny_model
from prunesearch.cli import main
from pruners.methods import names
from pruners.oneshot import sparsity_table


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer, family):
    return saved_tiny_model(tmp_path / f"tiny-{family}", tiny_tokenizer, family, layers=3)


@pytest.mark.parametrize("pruner", names(searchable=True))
def test_search_and_realize_on_every_family(family, pruner, model_dir, calib_file, tmp_path, capsys):
    calib = calib_file
    run = tmp_path / "run"
    common = ["--model", str(model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
              "--device", "cpu"]
    assert main(["search", *common, "--pruner", pruner, "--budget", "sparsity=0.6", "--trials", "5",
                 "--predictor", "off", "--fitness-samples", "4", "--low-fidelity-samples", "2", "--report-ppl", "",
                 "--quiet", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["complete"] == 5 and report["best"]["fitness"] > 0  # the five heuristic seeds, each measured
    out = tmp_path / "pruned"
    assert main(["prune", *common, "--method", pruner, "--config", str(run / "best_config.json"),
                 "--out", str(out)]) == 0
    rows = sparsity_table(AutoModelForCausalLM.from_pretrained(out))
    pruned = sum(r["actual_sparsity"] * r["shape"][0] * r["shape"][1] for r in rows)
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    assert pruned / total == pytest.approx(0.6, abs=0.01)
