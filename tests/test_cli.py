"""End to end through the command line: every family prunes, saves and loads back; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import saved_tiny_model, tiny_model
from prunesearch import report
from prunesearch.cli import main
from prunesearch.safety import UserError
from pruners.registry import get_weight, layout


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer, family):
    return saved_tiny_model(tmp_path / f"tiny-{family}", tiny_tokenizer, family)


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "4:8")])
def test_every_family_prunes_saves_and_reloads_with_exact_sparsity(model_dir, calib_file, tmp_path, method,
                                                                    pattern, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--method", method, "--calib", str(calib_file),
            "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", str(out)]
    argv += ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    lay = layout(model)
    assert len(report["layers"]) == len(lay.projection_names())
    for row in report["layers"]:
        w = get_weight(lay.projections[row["block"]][row["name"]])
        zeros = (w == 0).sum().item()
        if pattern == "unstructured":
            assert zeros == w.numel() // 2, row["name"]  # every tiny layer has an even row length
        else:
            m = int(pattern.split(":")[1])
            assert ((w == 0).view(w.shape[0], -1, m).sum(-1) == m // 2).all(), row["name"]
        assert row["actual_sparsity"] == pytest.approx(zeros / w.numel())
        assert row["target_sparsity"] == 0.5
    assert report["protocol"]["seqlen"] == 32
    assert report["protocol"]["nsamples"] == (0 if method == "magnitude" else 4)
    assert torch.isfinite(model(torch.randint(0, 320, (1, 16))).logits).all()


def test_per_layer_config_from_json(tmp_path, tiny_tokenizer, calib_file):
    path = tmp_path / "tiny"
    tiny_model("llama", layers=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"sparsity": {"0": 0.25, "model.layers.2.mlp.down_proj": 0.75}, "default": 0.5}))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(path), "--method", "wanda", "--config", str(config), "--calib",
                 str(calib_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "prune_report.json").read_text())["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["actual_sparsity"] == 0.25
    assert rows["model.layers.1.mlp.up_proj"]["actual_sparsity"] == 0.5
    assert rows["model.layers.2.mlp.down_proj"]["actual_sparsity"] == 0.75
    assert rows["model.layers.2.mlp.up_proj"]["actual_sparsity"] == 0.5


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunesearch: error:")
    return err[0]


@pytest.mark.parametrize("family", ["llama"])
def test_bad_input_is_one_clear_line_and_writes_nothing(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["prune", "--method", "wanda", "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32",
            "--device", "cpu", "--out", str(out)]
    assert "does not exist" in _refused(base + ["--model", str(tmp_path / "missing"), "--sparsity", "0.5"], capsys)
    assert "[0, 1)" in _refused(base + ["--model", str(model_dir), "--sparsity", "1.2"], capsys)
    assert "0 < N < M" in _refused(base + ["--model", str(model_dir), "--pattern", "4:2"], capsys)
    bad_data = ["prune", "--method", "wanda", "--calib", "nosuchset", "--nsamples", "2", "--seqlen", "32",
                "--device", "cpu", "--out", str(out), "--model", str(model_dir), "--sparsity", "0.5"]
    assert "nosuchset" in _refused(bad_data, capsys)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"sparsity": {"9": 0.5}}))
    assert "does not have" in _refused(base + ["--model", str(model_dir), "--config", str(config)], capsys)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in _refused(base + ["--model", str(model_dir), "--sparsity", "0.5"], capsys)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["gpt2"])
def test_eval_reports_perplexity_and_kl(model_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.6",
                 "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--ppl", str(calib_file), "--seqlen", "32", "--device", "cpu",
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ppl"][str(calib_file)]["seqlen"] == 32
    assert 1.0 < result["ppl"][str(calib_file)]["ppl"] < 1e4


@pytest.mark.parametrize("error", [ValueError("internal"), FileNotFoundError("internal"), KeyError("internal")])
def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, capsys, error):
    """Only a UserError is a one-line usage error: a bug (a plain ValueError included) is not disguised as one."""
    def build(*args, **kwargs):
        raise error

    monkeypatch.setattr(report, "build", build)
    with pytest.raises(type(error), match="internal") as raised:
        main(["report", str(tmp_path)])
    assert not isinstance(raised.value, UserError)
    assert "prunesearch: error" not in capsys.readouterr().err


def test_a_user_error_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    def build(*args, **kwargs):
        raise UserError("run folder refused: the reason and the fix")

    monkeypatch.setattr(report, "build", build)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == ["prunesearch: error: run folder refused: the reason and the fix"]
    monkeypatch.setenv("PRUNESEARCH_DEBUG", "1")  # the traceback on request
    with pytest.raises(UserError, match="the reason and the fix"):
        main(["report", str(tmp_path)])


def test_library_errors_on_user_files_are_one_line(tmp_path, capsys):
    """A damaged file the user points at is a one-line error naming it, not the reading library's traceback."""
    assert "is not a finished search run (no trials.parquet)" in _refused(["report", str(tmp_path)], capsys)
    (tmp_path / "trials.parquet").write_bytes(b"not parquet at all")
    line = _refused(["export", "--run", str(tmp_path), "--out", str(tmp_path / "best.json")], capsys)
    assert f"trials table {tmp_path / 'trials.parquet'} is not a readable parquet table" in line
    predictor = tmp_path / "predictor"
    predictor.mkdir()
    (predictor / "predictor.json").write_text('{"format": ')
    line = _refused(["predictor", "evaluate", "--predictor", str(predictor), "--on", str(tmp_path)], capsys)
    assert "predictor.json is not readable JSON" in line
    config = tmp_path / "bad.yaml"
    config.write_text("sparsity: {0: 0.5\npattern: [")
    line = _refused(["prune", "--method", "magnitude", "--config", str(config), "--out", str(tmp_path / "out")],
                    capsys)
    assert "is not valid YAML" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "predictor", "trials.parquet"]
