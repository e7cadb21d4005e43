"""``prunesearch search --space both``: per block widths plus the unstructured sparsity of the kept weights, every
candidate at most at the params budget of nonzero parameters, masked candidates equal to sliced-then-masked models,
and ``realize`` slicing then pruning the best one with Wanda."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

import prunesearch  # noqa: F401  (registers the sliced models' classes for AutoModelForCausalLM)
from conftest import assert_refused, saved_tiny_model, search_settings, structured_search_argv, tiny_model
from pruners.registry import get_weight, layout, set_weight
from pruners.width.counting import shapes
from pruners.width.geometry import geometry, sub
from pruners.width.slicing import realize as slice_widths
from prunesearch.cli import main
from prunesearch.pruning import nonzero_params
from search.both_space import make_both_space
from search.study import open_workspace

TRIALS = 10


def _search_argv(model_dir, calib_file, out, *extra) -> list[str]:
    return structured_search_argv("both", model_dir, calib_file, out, *extra, trials=TRIALS)


def _kept_rows(space, alloc) -> int:
    """Output rows of the kept projections: the projection may stop up to one weight per row under the budget."""
    kept = space.split(alloc)[0].reshape(-1, 2)
    return int((kept[:, 0] * space.rows[0] + kept[:, 1] * space.rows[1]).sum()) + 2 * space.hidden * len(kept)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("budget", ["params=60%", "params=50%,flops=70%"])
def test_projection_lands_on_the_budget(family, budget):
    model = tiny_model(family, layers=4)
    geom, lay = geometry(model), layout(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(lay.numel(n) for n in lay.projection_names())
    space = make_both_space(geom, shapes(model, geom), budget, total, 32, prunable)
    assert space.budget == int(float(budget.split(",")[0][7:-1]) / 100 * total)
    assert space.units[:2] == ("0.attn", "0.mlp") and space.units[-1] == "3.sparsity" and space.dim == 12
    rng = np.random.default_rng(0)
    samples = rng.uniform(space.low, space.high, size=(60, space.dim))
    for x in np.r_[samples, list(space.seeds({}).values())]:
        alloc = space.project(x)
        kept, s = space.split(alloc)
        assert (kept >= 1).all() and (kept <= space.width.counts).all() and space.free.feasible(kept)
        assert ((s >= 0) & (s <= space.s_high)).all()
        gap = space.budget - space.nonzero(alloc)
        if s.max() > 0:  # at most the budget, less than one weight per kept output row under it
            assert 0 <= gap < _kept_rows(space, alloc)
        else:  # widths alone: grown until no group or channel fits
            assert 0 <= gap < space.width.costs.max() and space.width.params(kept) == space.nonzero(alloc)
        np.testing.assert_array_equal(space.project(x), alloc)  # deterministic


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    return saved_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", tiny_tokenizer, "gpt2", layers=4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_masked_candidate_equals_the_sliced_model_masked_alike(family, tiny_llama_dir, gpt2_dir, tiny_tokenizer,
                                                               tiny_calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    model_dir = {"llama": tiny_llama_dir, "gpt2": gpt2_dir}.get(family) or saved_tiny_model(
        tmp_path / f"tiny-{family}", tiny_tokenizer, family, layers=4)
    settings = search_settings(model_dir, tiny_calib_file, space="both", budget="params=55%", min_sparsity=None,
                               max_sparsity=None)
    ws = open_workspace(settings, tmp_path / "ws", "cpu")
    geom, sp = geometry(ws.model), ws.space
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    for x in rng.uniform(sp.low, sp.high, size=(3, sp.dim)):
        alloc = ws.allocation(x)
        ws.realize(alloc)
        with torch.no_grad():
            masked = ws.model(ids).logits
        sliced = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        widths = sp.widths(alloc)
        slice_widths(sliced, widths, ws.importance)
        cut = layout(sliced)
        for i, w in enumerate(widths):  # the sliced model's projections masked where the candidate is zero
            groups, channels = ws.importance.keep(i, w.kv_heads, w.intermediate)
            every = slice(None)
            places = {p: (r, every) for p, r in zip(geom.heads.qkv, geom.qkv_rows(i, groups))}
            places |= {p: (channels, every) for p in (geom.ffn.up, geom.ffn.gate) if p}
            places |= {geom.heads.out: (every, geom.out_columns(groups)), geom.ffn.down: (every, channels)}
            for path, (rows, cols) in places.items():
                candidate = get_weight(sub(geom.block(i), path))[rows][:, cols]
                module = sub(cut.blocks[i], path)
                set_weight(module, get_weight(module).masked_fill(candidate == 0, 0))
        assert nonzero_params(sliced) == sp.nonzero(alloc) <= sp.budget
        with torch.no_grad():
            torch.testing.assert_close(sliced(ids).logits, masked, rtol=1e-5, atol=1e-5)
    ws.reset()
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(ws.model.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("family,sampler,budget", [("llama", "tpe", "params=60%"),
                                                   ("gpt2", "qmc", "params=60%,flops=80%")])
def test_both_search_meets_the_budget_and_realizes(family, sampler, budget, tiny_llama_dir, gpt2_dir,
                                                   tiny_calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_llama_dir if family == "llama" else gpt2_dir
    run = tmp_path / "run"
    assert main(_search_argv(model_dir, tiny_calib_file, run, "--budget", budget, "--sampler", sampler)) == 0
    frame = pd.read_parquet(run / "trials.parquet")
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in dense.parameters())
    limit = int(0.6 * total)
    done = frame[frame["state"] == "COMPLETE"]
    assert len(frame) == TRIALS and len(done) >= TRIALS // 2
    assert list(frame["label"][:4]) == ["uniform-sparsity", "uniform-width", "flap", "flap-half+sparsity"]
    lay = layout(dense)
    rows = sum(get_weight(m).shape[0] for block in lay.projections for m in block.values())
    assert ((done["nonzero_params"] <= limit) & (limit - done["nonzero_params"] < rows)).all()
    assert {c for c in frame.columns if c[:2] in ("w[", "s[")} == \
        {f"w[{i}.{k}]" for i in range(4) for k in ("attn", "mlp")} | {f"s[{i}]" for i in range(4)}
    first = frame.iloc[0]  # pure sparsity: dense widths (as far as a flops limit allows); pure width: no sparsity
    assert (first["sliced_params"] == total) == ("flops" not in budget)
    assert first["s[0]"] > 0 and frame.iloc[2]["s[0]"] == 0
    if "flops" in budget:
        flops = json.loads((run / "space.json").read_text())["limits"][1]
        assert flops.startswith("flops ≤") and "flops" in frame.columns
    space = json.loads((run / "space.json").read_text())
    assert space["space"] == "both" and space["sparsity_units"] == [f"{i}.sparsity" for i in range(4)]

    config = json.loads((run / "best_config.json").read_text())
    best = done.loc[done["fitness"].idxmin()]
    assert config["meta"]["nonzero_params"] == best["nonzero_params"] and config["meta"]["space"] == "both"
    assert set(config) == {"width", "sparsity", "pattern", "meta"} and len(config["sparsity"]) == 4
    exported = tmp_path / "best.json"  # export gives back the best config from the trials table
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    again = json.loads(exported.read_text())
    assert {k: again[k] for k in ("width", "sparsity", "pattern")} == {k: config[k] for k in ("width", "sparsity",
                                                                                                "pattern")}
    for key in ("nonzero_params", "sliced_params", "fitness", "space", "budget_limits"):
        assert again["meta"][key] == config["meta"][key]
    out = tmp_path / "realized"
    assert main(["realize", "--config", str(exported), "--ppl", "", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "realize_report.json").read_text())
    assert report["method"] == "wanda" and report["nonzero_params"] == best["nonzero_params"]
    assert [r["heads"] for r in report["width"]["layers"]] == [v["heads"] for v in config["width"].values()]
    from prunesearch.models import load_model

    for model in (AutoModelForCausalLM.from_pretrained(out), load_model(str(out))[0]):
        assert nonzero_params(model) == best["nonzero_params"]


def test_a_params_range_searches_a_front_of_fitness_against_nonzero_params_saved(tiny_llama_dir, tiny_calib_file,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "front"
    argv = structured_search_argv("both", tiny_llama_dir, tiny_calib_file, run, "--budget", "params=40%:70%",
                                  trials=16)
    assert main(argv) == 0
    frame = pd.read_parquet(run / "trials.parquet")
    done = frame[frame.state == "COMPLETE"]
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    assert done.label.str.contains("@").sum() >= 12  # 4 seeds at 3 budget levels
    saved = done.budget_sparsity.to_numpy()
    np.testing.assert_allclose(saved, 1 - done.nonzero_params.to_numpy() / total)
    assert saved.min() >= 0.3 - 1e-9 and 0.6 <= saved.max() < 0.61  # every trial meets its own level's budget
    front = pd.read_csv(run / "pareto.csv")
    assert len(front) >= 2
    for _, row in front.iterrows():  # nothing measured is better on both objectives than a front point
        assert not ((done.fitness < row.fitness - 1e-12) & (done.budget_sparsity > row.sparsity + 1e-12)).any()
    point = front.iloc[-1]
    config = json.loads((run / point.config).read_text())
    assert set(config) == {"width", "sparsity", "pattern", "meta"} and config["meta"]["space"] == "both"
    out = tmp_path / "realized"
    assert main(["realize", "--config", str(run / point.config), "--ppl", "", "--device", "cpu", "--out",
                 str(out)]) == 0
    assert nonzero_params(AutoModelForCausalLM.from_pretrained(out)) == point.nonzero_params


def test_both_search_refuses_gpt_neox_in_one_line(tiny_tokenizer, tiny_calib_file, tmp_path, capsys):
    model_dir = saved_tiny_model(tmp_path / "gpt_neox", tiny_tokenizer, "gpt_neox")
    out = tmp_path / "run"
    assert_refused(_search_argv(model_dir, tiny_calib_file, out, "--budget", "params=60%"), "'gpt_neox'", out, capsys)


@pytest.mark.parametrize("extra,message", [
    (["--budget", "sparsity=0.5"], "--space both searches a params= budget"),
    (["--budget", "flops=70%"], "--space both searches a params= budget"),
    (["--budget", "params=50%:70%,flops=60%:80%"], "only one limit may be a range"),
    (["--budget", "params=60%,flops=60%:80%"], "--space both searches a params= budget"),
    (["--budget", "params=60%", "--pruner", "magnitude"], "--pruner magnitude does not apply"),
    (["--budget", "params=60%", "--pattern", "2:4"], "--pattern 2:4 does not apply"),
    (["--budget", "params=60%", "--sampler", "evo"], "--space both needs tpe, qmc or nsga2"),
    (["--budget", "params=60%", "--predictor", "on"], "--space both needs --predictor off"),
    (["--budget", "params=1K"], "is infeasible for --space width"),
])
def test_bad_both_search_input_is_one_line_exit_2_and_leaves_nothing(tiny_llama_dir, tiny_calib_file, tmp_path,
                                                                      capsys, extra, message):
    out = tmp_path / "x"
    assert_refused(_search_argv(tiny_llama_dir, tiny_calib_file, out, *extra), message, out, capsys)
