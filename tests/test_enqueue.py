"""Starting a search from a config (``--enqueue``): a block-level answer spread to projections (coarse to fine),
and the evolution's kind shifts in a projection-level space."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, saved_tiny_model, search_argv, search_settings, tiny_model
from pruners.registry import layout
from pruners.targets import SparsityConfig
from search.engine import Selection, run_search
from search.samplers import kind_groups, mutate
from search.seeds import from_config
from search.space import make_space


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def test_a_block_config_spreads_to_projections_and_a_projection_config_averages_into_blocks():
    lay = layout(tiny_model("llama"))
    proj = make_space(lay, 0.6, 0.3, 0.9, "projection")
    spread = from_config(proj, lay, SparsityConfig.from_dict({"sparsity": {"0": 0.5, "1": 0.7}}))
    assert spread.tolist() == pytest.approx([0.5 if b == 0 else 0.7 for b in proj.blocks], abs=1e-12)

    block = make_space(lay, 0.6, 0.3, 0.9, "block")
    names = lay.projection_names()
    values = {n: 0.3 + 0.05 * i for i, n in enumerate(names)}
    sizes = {n: lay.numel(n) for n in names}
    by_hand = [sum(sizes[n] * values[n] for n in names if lay.block_of(n) == b) /
               sum(sizes[n] for n in names if lay.block_of(n) == b) for b in range(lay.num_blocks)]
    averaged = from_config(block, lay, SparsityConfig.from_dict({"sparsity": values}))
    np.testing.assert_allclose(averaged, block.project(np.array(by_hand)), atol=1e-12)
    assert block.mean(averaged) == pytest.approx(0.6, abs=1e-12)  # fitted to this budget
    assert averaged[1] - averaged[0] == pytest.approx(by_hand[1] - by_hand[0], abs=1e-9)  # shape kept


def test_kind_shift_moves_one_projection_kind_up_and_another_down_in_every_block():
    lay = layout(tiny_model("llama"))
    assert kind_groups(make_space(lay, 0.6, 0.3, 0.9, "block")) == []
    space = make_space(lay, 0.6, 0.3, 0.9, "projection")
    groups = kind_groups(space)
    assert len(groups) == 7 and all(len(g) == lay.num_blocks for g in groups)
    assert {space.kinds[g[0]] for g in groups} == {n.split(".", 3)[3] for n in lay.projection_names()}
    delta = 0.05 * space.sizes.mean() / space.sizes
    parent = np.full(space.dim, 0.6)
    rng = np.random.default_rng(0)
    shifts = 0
    for _ in range(40):
        child = mutate(space, rng, parent, step=0.05, wave=1.0)
        moved = [g for g in groups if np.any(np.abs(child[g] - parent[g]) > 1e-12)]
        if len(moved) == 2 and all(np.allclose(np.abs(child[g] - parent[g]), delta[g]) for g in moved):
            shifts += 1
            assert space.mean(child) == pytest.approx(0.6, abs=1e-12)  # the same weights moved up as down
            assert sorted(np.sign(child[g] - parent[g])[0] for g in moved) == [-1.0, 1.0]
    assert 10 <= shifts <= 30  # about half of the wave moves


def test_a_projection_search_starts_from_a_block_answer(tiny_llama_dir, tiny_calib_file, tmp_path):
    from prunesearch.cli import main

    block = tmp_path / "block"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, block, "--select-top", "0", trials=10)) == 0
    answer = json.loads((block / "best_config.json").read_text())
    fine = tmp_path / "fine"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, fine, "--granularity", "projection", "--sampler", "evo",
                            "--select-top", "0", "--enqueue", block / "best_config.json", trials=14)) == 0
    frame = pd.read_parquet(fine / "trials.parquet")
    start = frame[frame.label == "start:best_config.json"]
    assert len(start) == 1
    lay = layout(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    spread = [answer["sparsity"][str(lay.block_of(n))] for n in lay.projection_names()]
    assert start[[f"s[{n}]" for n in lay.projection_names()]].to_numpy()[0] == pytest.approx(spread, abs=1e-9)
    # the same masks as the block run's answer (Wanda ranks are per projection): the same fitness
    best_block = pd.read_parquet(block / "trials.parquet").query("state == 'COMPLETE'").fitness.min()
    assert start.fitness.iloc[0] == pytest.approx(best_block, rel=1e-6)
    report = json.loads((fine / "report.json").read_text())
    assert "start:best_config.json" in report["seeds"]
    assert "start:best_config.json" in (fine / "report.html").read_text()
    assert report["best"]["fitness"] <= best_block  # the evolution starts from it and keeps the better
    recorded = json.loads((fine / "run_config.json").read_text())["enqueue"]
    assert recorded == [str((block / "best_config.json").resolve())]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sparsegpt_projection_search_from_a_block_config_on_every_family(family, tmp_path, tiny_tokenizer,
                                                                          tiny_calib_file):
    model_dir = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    lay = layout(tiny_model(family))
    groups = kind_groups(make_space(lay, 0.6, 0.3, 0.9, "projection"))
    assert len(groups) == len(lay.projections[0]) and all(len(g) == 2 for g in groups)  # fused QKV is one kind
    start = tmp_path / "block.json"
    start.write_text(json.dumps({"sparsity": {"0": 0.5, "1": 0.7}}))
    out = tmp_path / "run"
    settings = search_settings(model_dir, tiny_calib_file, pruner="sparsegpt", level_step=0.1, sampler="evo",
                               granularity="projection", enqueue=[str(start)])
    summary = run_search(settings, out, trials=12, report_ppl=(), progress=False, selection=Selection(0, 3))
    seed = summary["seeds"]["start:block.json"]
    assert np.isfinite(seed["fitness"]) and summary["best"]["fitness"] <= seed["fitness"]
    frame = pd.read_parquet(out / "trials.parquet")
    alloc = frame.loc[frame.number == seed["trial"], [f"s[{n}]" for n in lay.projection_names()]].to_numpy()[0]
    first = np.array([lay.block_of(n) == 0 for n in lay.projection_names()])
    assert alloc[first].mean() < alloc[~first].mean()  # the config's shape survives the snap to the level grid
