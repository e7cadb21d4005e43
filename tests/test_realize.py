"""``prunesearch realize``: the chosen allocation pruned for real, evaluated on report data, with its protocol."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, finished_search
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunesearch import data
from prunesearch.cli import main
from prunesearch.evaluate import perplexity

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "shared_data"


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tiny_calib_file, tmp_path_factory):
    """A finished 6-trial search on the tiny LLaMA (60% budget)."""
    return finished_search(tiny_llama_dir, tiny_calib_file, tmp_path_factory.mktemp("realize"), 6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The zero-shot fixtures plus a small PTB test file, laid out like shared/data."""
    folder = tmp_path_factory.mktemp("data") / "shared_data"
    shutil.copytree(FIXTURE_DATA, folder)
    (folder / "ptb").mkdir()
    (folder / "ptb" / "ptb.test.txt").write_text(TINY_TEXT.lower().replace(". ", " \n"))
    return folder


def test_realize_prunes_the_best_allocation_and_reports_protocol_and_report_data(
        finished_run, tiny_calib_file, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "realized"
    assert main(["realize", "--run", str(finished_run), "--method", "sparsegpt", "--calib", str(tiny_calib_file),
                 "--nsamples", "4", "--seqlen", "32", "--data-dir", str(data_dir), "--ppl", "wikitext2,ptb",
                 "--tasks", "arc_easy", "--limit", "3", "--out", str(out)]) == 0
    report = json.loads((out / "realize_report.json").read_text())
    best = json.loads((finished_run / "best_config.json").read_text())
    assert report["search"] == best["meta"] and report["allocation_from"] == str(finished_run / "best_config.json")
    assert report["method"] == "sparsegpt" and report["format"] == "hf"
    assert report["protocol"]["seqlen"] == 32 and report["protocol"]["nsamples"] == 4
    assert report["protocol"]["calib"]["calibration"]["file"] == str(tiny_calib_file)
    assert report["eval_protocol"] == {"datasets": ["wikitext2", "ptb"], "tasks": ["arc_easy"], "limit": 3,
                                       "seqlen": 32, "batch_size": 8}
    for row in report["layers"]:  # every projection at its block's searched sparsity
        assert row["target_sparsity"] == pytest.approx(best["sparsity"][str(row["block"])])
        assert abs(row["actual_sparsity"] - row["target_sparsity"]) < 0.02
    assert report["ppl"]["ptb"]["source"]["evaluation"]["file"] == str(data_dir / "ptb" / "ptb.test.txt")
    assert report["tasks"]["protocol"]["limit"] == 3 and "arc_easy" in report["tasks"]["results"]
    # the saved folder is the model that was measured: its perplexity on the same windows is the reported one
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = data.eval_ids(AutoTokenizer.from_pretrained(out), "wikitext2", str(data_dir))
    assert perplexity(model, ids, 32, 8, 3) == pytest.approx(report["ppl"]["wikitext2"]["ppl"], rel=1e-5)
    assert math.isfinite(report["ppl"]["ptb"]["ppl"])


def test_realize_refuses_before_pruning(finished_run, tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["--calib", str(tiny_calib_file), "--nsamples", "2", "--seqlen", "32", "--out", str(out)]
    assert main(["realize", "--run", str(finished_run), "--method", "wanda", "--ppl", "ptb", *common]) == 2
    assert "no ptb text for evaluation" in capsys.readouterr().err
    assert main(["realize", "--run", str(finished_run), "--method", "wanda", "--wbits", "4", *common]) == 2
    assert main(["realize", "--run", str(finished_run), *common]) == 2
    assert "a sparsity allocation needs --method" in capsys.readouterr().err
    assert main(["realize", "--run", str(tmp_path), "--method", "wanda", *common]) == 2
    assert "no best_config.json" in capsys.readouterr().err
    assert not out.exists()
