"""``prunesearch search --space width``: candidates on the params budget in whole groups and channels, labelled seeds
measured first, and a best config that ``prune --method width`` slices into the searched model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_refused, saved_tiny_model, search_settings, structured_search_argv, tiny_width_model
from pruners.width.counting import shapes
from pruners.width.geometry import geometry
from prunesearch.cli import main
from search.space import parse_budget
from search.study import open_workspace
from search.width_space import make_width_space

TRIALS = 10


def _search_argv(model_dir, calib_file, out, *extra) -> list[str]:
    return structured_search_argv("width", model_dir, calib_file, out, *extra, trials=TRIALS)


def test_projection_lands_on_the_budget_in_whole_units():
    model, geom, s, total = tiny_width_model()
    space = make_width_space(geom, s, "params=70%", total, 32)
    budget = space.constraint("params").bound
    assert budget == pytest.approx(0.7 * total) and space.dim == 8 and space.units[:2] == ("0.attn", "0.mlp")
    rng = np.random.default_rng(0)
    for x in rng.uniform(space.low, space.high, size=(50, space.dim)):
        kept = space.project(x)
        assert (kept >= 1).all() and (kept <= space.counts).all()
        assert 0 <= budget - space.params(kept) < s.channel_params()
        assert space.params(kept) == s.other_params + sum(s.block_params(w) for w in space.widths(kept))


def test_params_share_budget_for_the_sparsity_space(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from pruners.registry import layout

    total = sum(p.numel() for p in model.parameters())
    assert parse_budget("params=80%", layout(model), total)[1] == pytest.approx(0.8 * total)


@pytest.mark.parametrize("family,sampler", [("llama", "tpe"), ("gpt2", "qmc")])
def test_width_search_meets_budget_beats_uniform_and_prunes_to_the_trial(family, sampler, tiny_llama_dir,
                                                                         tiny_tokenizer, tiny_calib_file, tmp_path):
    # LLaMA: GQA, 2 key/value groups of 2 query heads; GPT-2: fused c_attn, Conv1D, tied LM head
    model_dir = tiny_llama_dir if family == "llama" else saved_tiny_model(tmp_path / "tiny-gpt2", tiny_tokenizer,
                                                                          "gpt2", layers=4)
    run = tmp_path / "run"
    assert main(_search_argv(model_dir, tiny_calib_file, run, "--budget", "params=75%", "--sampler", sampler)) == 0
    frame = pd.read_parquet(run / "trials.parquet")
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in dense.parameters())
    s = shapes(dense, geometry(dense))
    budget = int(0.75 * total)
    done = frame[frame["state"] == "COMPLETE"]
    assert len(frame) == TRIALS and len(done) >= TRIALS // 2
    assert (done["nonzero_params"] <= budget).all()
    assert (budget - done["nonzero_params"] < s.channel_params()).all()
    assert list(frame["label"][:2]) == ["uniform-width", "flap"] and list(frame["number"][:2]) == [0, 1]
    assert {c for c in frame.columns if c.startswith("w[")} == {f"w[{i}.{k}]" for i in range(4)
                                                                 for k in ("attn", "mlp")}
    report = json.loads((run / "report.json").read_text())
    assert report["best"]["fitness"] <= report["seeds"]["uniform-width"]["fitness"]
    best = done[done["number"] == report["selection"]["chosen"]].iloc[0]  # the final selection's pick
    assert report["best"]["fitness"] == pytest.approx(best["fitness"])

    config = json.loads((run / "best_config.json").read_text())
    assert config["meta"]["params"] == best["nonzero_params"] and config["meta"]["trial"] == best["number"]
    out = tmp_path / "sliced"
    assert main(["prune", "--method", "width", "--model", str(model_dir), "--config", str(run / "best_config.json"),
                 "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
                 "--out", str(out)]) == 0
    sliced = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in sliced.parameters()) == best["nonzero_params"] < total
    heads = [w.heads for w in geometry(sliced).widths]
    assert heads == [v["heads"] for v in config["width"].values()]

    # the saved model is exactly the candidate the search measured (masked with the same importance)
    settings = search_settings(model_dir, tiny_calib_file, space="width", budget="params=75%", min_sparsity=None,
                               max_sparsity=None)
    ws = open_workspace(settings, tmp_path / "again", "cpu")
    ws.realize(np.array([int(best[f"w[{u}]"]) for u in ws.space.units]))
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids).logits, ws.model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--budget", "sparsity=0.5"], "needs params=, flops=, memory= or latency= budgets"),
    (["--budget", "params=75%", "--pattern", "2:4"], "--pattern 2:4 does not apply"),
    (["--budget", "params=75%", "--pruner", "sparsegpt"], "--pruner sparsegpt does not apply"),
    (["--budget", "params=60%:80%,flops=50%:70%"], "only one limit may be a range"),
    (["--budget", "params=75%,params=80%"], "limits the same kind twice"),
    (["--budget", "flops=70%@0"], "@N (a positive token count)"),
    (["--budget", "memory=3parsecs"], "unknown unit 'parsecs' for memory"),
    (["--budget", "flops=1%"], "flops ≤"),
    (["--budget", "params=75%", "--sampler", "evo"], "needs tpe, qmc or nsga2"),
    (["--budget", "params=120%"], "share in (0%, 100%]"),
    (["--budget", "params=1K"], "is infeasible for --space width"),
])
def test_bad_width_search_input_is_one_line_exit_2_and_leaves_nothing(tiny_llama_dir, tiny_calib_file, tmp_path,
                                                                        capsys, extra, message):
    out = tmp_path / "x"
    assert_refused(_search_argv(tiny_llama_dir, tiny_calib_file, out, *extra), message, out, capsys)
