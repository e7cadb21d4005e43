"""Width search end to end on every family width pruning slices (GQA LLaMA, Qwen2's q/k/v biases, OPT's biases and
learned positions, GPT-2's fused Conv1D attention and tied LM head): the best config meets the params budget, the
masked candidate the search measured is exactly the sliced model, and the sliced model saves and loads back.
GPT-NeoX, whose heads width pruning cannot split, is refused in one line."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, saved_tiny_model, search_settings
from prunesearch.cli import main
from pruners.width.allocation import from_config
from pruners.width.geometry import geometry
from pruners.width.slicing import realize
from search.engine import open_workspace, run_search

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_width_search_meets_budget_and_its_best_slices_saves_and_loads_exactly(family, tiny_tokenizer, calib_file,
                                                                              tmp_path):
    model_dir = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    settings = search_settings(model_dir, calib_file, space="width", budget="params=75%", min_sparsity=None,
                               max_sparsity=None)
    cache = tmp_path / "cache"
    summary = run_search(settings, tmp_path / "run", trials=4, report_ppl=(), progress=False, cache_dir=cache)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = json.loads((tmp_path / "run" / "best_config.json").read_text())
    assert summary["complete"] >= 2 and config["meta"]["params"] == summary["best"]["nonzero_params"]
    budget = int(0.75 * _numel(dense))
    assert config["meta"]["params"] <= budget
    frame = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert (frame.loc[frame["state"] == "COMPLETE", "nonzero_params"] <= budget).all()

    widths = from_config(geometry(dense), config["width"])
    ws = open_workspace(settings, tmp_path / "again", cache_dir=cache)  # the search's scores, from its cache
    ws.realize(ws.space.kept(widths))
    sliced = copy.deepcopy(dense)
    realize(sliced, widths, ws.importance)
    assert _numel(sliced) == config["meta"]["params"]
    torch.testing.assert_close(_logits(sliced), _logits(ws.model), atol=1e-5, rtol=0)

    sliced.save_pretrained(tmp_path / "sliced")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced").eval()
    assert loaded.config.model_type == f"prunesearch_{family}" and geometry(loaded).widths == widths
    torch.testing.assert_close(_logits(loaded), _logits(sliced), atol=1e-6, rtol=0)


def test_width_search_refuses_gpt_neox_in_one_line_naming_what_is_missing(tiny_tokenizer, calib_file, tmp_path,
                                                                          capsys):
    model_dir = saved_tiny_model(tmp_path / "gpt_neox", tiny_tokenizer, "gpt_neox")
    out = tmp_path / "run"
    argv = ["search", "--space", "width", "--budget", "params=75%", "--model", str(model_dir), "--calib",
            str(calib_file), "--nsamples", "4", "--seqlen", "32", "--fitness-samples", "6", "--low-fidelity-samples",
            "2", "--device", "cpu", "--report-ppl=", "--quiet", "--trials", "4", "--out", str(out)]
    capsys.readouterr()  # the save's progress bar
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gpt_neox'" in err and "Heads and FFN" in err
    assert "pruners/registry.py" in err and not out.exists()
