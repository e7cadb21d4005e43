"""``prunesearch prune --method width`` end to end: sliced models that reload, reports, and refused input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import saved_tiny_model, tiny_model
from pruners.width.geometry import BlockWidth, geometry
from prunesearch.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    return saved_tiny_model(tmp_path / "tiny-opt", tiny_tokenizer, "opt")


def _argv(model_dir, calib_file, out, *extra) -> list[str]:
    return ["prune", "--model", str(model_dir), "--method", "width", "--calib", str(calib_file), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--out", str(out), *extra]


def test_uniform_width_slices_reports_and_reloads(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(_argv(model_dir, calib_file, out, "--width", "0.5", "--width-score", "wanda",
                      "--bias-compensation")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert [(r["heads"], r["kv_heads"], r["intermediate"]) for r in report["layers"]] == [(2, 2, 64)] * 2
    dense = sum(p.numel() for p in tiny_model("opt").parameters())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert report["before"]["params"] == dense
    assert report["after"]["params"] == sum(p.numel() for p in model.parameters()) < dense
    assert report["score"] == "wanda" and report["bias_compensation"] and report["protocol"]["nsamples"] == 4
    assert geometry(model).widths == [BlockWidth(2, 2, 64)] * 2
    assert "parameters" in capsys.readouterr().out


def test_config_width_section_and_global_allocation(model_dir, calib_file, tmp_path):
    config = tmp_path / "width.json"
    config.write_text(json.dumps({"width": {"1": {"heads": 1, "intermediate": 40}}}))
    assert main(_argv(model_dir, calib_file, tmp_path / "c", "--config", str(config))) == 0
    assert geometry(AutoModelForCausalLM.from_pretrained(tmp_path / "c")).widths == [BlockWidth(4, 4, 128),
                                                                                    BlockWidth(1, 1, 40)]
    assert main(_argv(model_dir, calib_file, tmp_path / "g", "--width", "0.7", "--width-allocation", "global")) == 0
    report = json.loads((tmp_path / "g" / "prune_report.json").read_text())
    kept = report["after"]["block_params"] / report["before"]["block_params"]
    assert 0.65 < kept <= 0.7


@pytest.mark.parametrize("extra,message", [
    ([], "needs --width in (0, 1]"),
    (["--width", "1.5"], "needs --width in (0, 1]"),
    (["--width", "0.5", "--width-score", "fisher"], "--width-score must be one of wanda, flap, taylor"),
    (["--width", "0.5", "--pattern", "2:4"], "do not apply to --method width"),
])
def test_bad_width_input_is_one_line_and_exit_2(model_dir, calib_file, tmp_path, capsys, extra, message):
    assert main(_argv(model_dir, calib_file, tmp_path / "x", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_width_flags_with_another_method_and_bias_on_qwen2_are_refused(tmp_path, calib_file, tiny_tokenizer,
                                                                          capsys):
    path = tmp_path / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    argv = ["prune", "--model", str(path), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "16",
            "--device", "cpu", "--out", str(tmp_path / "y")]
    assert main(argv + ["--method", "wanda", "--sparsity", "0.5", "--bias-compensation"]) == 2
    assert "--bias-compensation only work with --method width" in capsys.readouterr().err
    assert main(argv + ["--method", "width", "--width", "0.5", "--bias-compensation"]) == 2
    assert "qwen2 models have none and cannot add them" in capsys.readouterr().err
