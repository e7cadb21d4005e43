"""A finished width run taken further: ``realize`` slices its best candidate (outputs equal to the masked one the
search measured), ``space.json`` records its space, and the report plots kept shares per block."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
import torch
from transformers import AutoModelForCausalLM

from conftest import search_settings
from predictors.features import make_spec
from predictors.pairs import run_pairs
from pruners.width.counting import shapes
from pruners.width.geometry import geometry
from prunesearch.cli import main
from prunesearch.models import load_model
from prunesearch.safety import UserError
from search.study import open_workspace


@pytest.fixture(scope="module")
def width_run(tiny_llama_dir, tiny_calib_file, tmp_path_factory):
    """A finished 8-trial width search on the tiny LLaMA (GQA: 2 key/value groups of 2 query heads) at 75%."""
    run = tmp_path_factory.mktemp("width") / "run"
    assert main(["search", "--space", "width", "--budget", "params=75%", "--model", str(tiny_llama_dir),
                 "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32", "--fitness-samples", "6",
                 "--low-fidelity-samples", "2", "--device", "cpu", "--report-ppl=", "--quiet", "--trials", "8",
                 "--out", str(run)]) == 0
    return run


def test_realize_slices_the_best_width_candidate_with_its_outputs(width_run, tiny_llama_dir, tiny_calib_file,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "realized"
    assert main(["realize", "--run", str(width_run), "--ppl", "wikitext2", "--limit", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    frame = pd.read_parquet(width_run / "trials.parquet")
    done = frame[frame["state"] == "COMPLETE"]
    best = done.loc[done["fitness"].idxmin()]
    config = json.loads((width_run / "best_config.json").read_text())
    report = json.loads((out / "realize_report.json").read_text())
    assert report["method"] == "width" and report["score"] == "flap" and not report["bias_compensation"]
    assert report["search"] == config["meta"] and report["allocation_from"] == str(width_run / "best_config.json")
    # scored on the search's own calibration protocol, read from the config's meta
    assert report["protocol"]["nsamples"] == 4 and report["protocol"]["seqlen"] == 32
    assert report["protocol"]["calib"]["calibration"]["file"] == str(tiny_calib_file)
    assert [(r["heads"], r["intermediate"]) for r in report["layers"]] == [(v["heads"], v["intermediate"])
                                                                           for v in config["width"].values()]
    assert report["after"]["params"] == config["meta"]["params"] == best["nonzero_params"]
    assert np.isfinite(report["ppl"]["wikitext2"]["ppl"])

    settings = search_settings(tiny_llama_dir, tiny_calib_file, space="width", budget="params=75%",
                               min_sparsity=None, max_sparsity=None)
    ws = open_workspace(settings, tmp_path / "again", "cpu")
    ws.realize(np.array([int(best[f"w[{u}]"]) for u in ws.space.units]))
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = ws.model(ids).logits
        for model in (AutoModelForCausalLM.from_pretrained(out), load_model(str(out))[0]):
            assert sum(p.numel() for p in model.parameters()) == best["nonzero_params"]
            torch.testing.assert_close(model(ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_width_run_records_its_space_reports_widths_and_refuses_sparsity_tools(width_run, tiny_llama_dir, tmp_path,
                                                                               capsys):
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    s = shapes(dense, geometry(dense))
    total = sum(p.numel() for p in dense.parameters())
    space = json.loads((width_run / "space.json").read_text())
    assert space["space"] == "width" and space["budget"] == "params=75%"
    assert space["units"] == [f"{i}.{k}" for i in range(4) for k in ("attn", "mlp")]
    assert space["blocks"] == [i for i in range(4) for _ in range(2)]
    assert space["counts"] == [2, 128] * 4 and space["group"] == 2
    assert space["costs"] == [s.group_params(), s.channel_params()] * 4
    assert space["dense_params"] == total == space["fixed"] + sum(n * c for n, c in zip(space["counts"],
                                                                                       space["costs"]))
    assert space["budget_params"] == int(0.75 * total) and space["width_score"] == "flap"
    frame = pd.read_parquet(width_run / "trials.parquet")  # the target and the trials' budget share mean the same
    assert frame["target_sparsity"].iloc[0] == pytest.approx(1 - (space["budget_params"] - space["fixed"])
                                                             / (space["dense_params"] - space["fixed"]))
    assert (frame["budget_sparsity"] >= frame["target_sparsity"] - 1e-12).all()

    html = tmp_path / "report.html"
    assert main(["report", str(width_run), "--out", str(html)]) == 0
    assert (tmp_path / "report_figures" / "allocation.png").stat().st_size > 0
    assert "widths per block" in html.read_text() and "flap" in html.read_text()

    best = json.loads((width_run / "best_config.json").read_text())
    assert main(["export", "--run", str(width_run), "--out", str(tmp_path / "x.json")]) == 0
    exported = json.loads((tmp_path / "x.json").read_text())
    assert exported["width"] == best["width"]  # the trials table gives back the search's own best config
    for key in ("fitness", "trial", "params", "budget_counts", "budget_limits", "width_score", "space"):
        assert exported["meta"][key] == best["meta"][key]
    assert main(["export", "--run", str(width_run), "--top", "3", "--format", "yaml", "--out",
                 str(tmp_path / "top")]) == 0
    top = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "top").iterdir())]
    assert [c["meta"]["fitness"] for c in top] == sorted(c["meta"]["fitness"] for c in top)
    assert top[0]["width"] == best["width"] and len({json.dumps(c["width"]) for c in top}) == 3
    assert main(["export", "--run", str(width_run), "--format", "llmcompressor", "--out",
                 str(tmp_path / "r.yaml")]) == 2
    assert "cannot remove heads or channels" in capsys.readouterr().err and not (tmp_path / "r.yaml").exists()
    with pytest.raises(UserError, match="is a width run; these features describe sparsity allocations"):
        run_pairs(width_run, make_spec())


def test_realize_refuses_a_sparsity_method_for_a_width_run(width_run, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["realize", "--run", str(width_run), "--method", "wanda", "--ppl", "", "--out", str(out)]) == 2
    assert "realized by slicing heads and channels" in capsys.readouterr().err
    assert not out.exists()
