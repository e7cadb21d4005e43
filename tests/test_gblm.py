"""GBLM-Pruner: α = 0 is Wanda, the gradient norms match an independent float64 computation, the gradient cache
reloads bit-exactly, every family prunes through the CLI, the search realizes one-shot GBLM's masks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import pruners.gblm as gblm
from conftest import tiny_model
from prunesearch import data
from prunesearch.cli import main
from prunesearch.models import load_model
from pruners.gblm import GBLM, gradient_pass
from pruners.masks import Target, expected_pruned
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import get_weight, layout
from pruners.targets import SparsityConfig
from pruners.walker import InputStats
from pruners.wanda import Wanda
from search.engine import SearchSettings, Workspace


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """Counts the gradient passes actually run (cache misses)."""
    calls: list[int] = []
    original = gblm.gradient_pass

    def counted(model, calib_ids, *args, **kwargs):
        calls.append(calib_ids.shape[0])
        return original(model, calib_ids, *args, **kwargs)

    monkeypatch.setattr(gblm, "gradient_pass", counted)
    return calls


def _ids(n: int = 4, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _weights(model) -> dict[str, torch.Tensor]:
    lay = layout(model)
    return {n: get_weight(lay.projections[lay.block_of(n)][n]).clone() for n in lay.projection_names()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alpha_zero_is_exactly_wanda_and_alpha_one_is_not(pattern):
    dense = tiny_model("llama")
    ids = _ids()
    targets = SparsityConfig.uniform(0.5, pattern).resolve(layout(dense))
    results = {}
    for label, pruner in [("wanda", Wanda()), ("gblm0", GBLM(alpha=0.0)), ("gblm1", GBLM())]:
        model = copy.deepcopy(dense)
        prune_model(model, pruner, targets, ids)
        results[label] = _weights(model)
    for name in results["wanda"]:
        assert torch.equal(results["gblm0"][name], results["wanda"][name]), name
    assert any(not torch.equal(results["gblm1"][n], results["wanda"][n]) for n in results["wanda"])


def test_score_is_wanda_plus_alpha_weighted_gradient_term():
    w = torch.randn(6, 8)
    stats = InputStats(8, full=False, extra=torch.rand(6, 8))
    stats.add(torch.randn(3, 5, 8))
    expected = w.abs() * stats.norm_sq.sqrt() + 2.5 * w.abs() * stats.extra
    torch.testing.assert_close(GBLM(alpha=2.5).score(w, stats), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="gradient norms"):
        GBLM().score(w, InputStats(8, full=False))


@pytest.mark.parametrize("family,norm", [("llama", "l2"), ("gpt2", "l2"), ("opt", "l1")])
def test_gradient_norms_equal_independent_float64_per_sequence_gradients(family, norm):
    model = tiny_model(family)
    ids = _ids(3, 16)
    got = gradient_pass(model, ids, norm=norm, scale=100.0)
    ref_model = copy.deepcopy(model).double()
    lay = layout(ref_model)
    names = lay.projection_names()
    params = [lay.projections[lay.block_of(n)][n].weight for n in names]
    acc = [torch.zeros_like(p) for p in params]
    for seq in ids:
        logits = ref_model(input_ids=seq.unsqueeze(0)).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, seq[1:])  # the causal-LM loss, written out
        for a, g in zip(acc, torch.autograd.grad(loss, params)):
            a += (100.0 * g) ** 2 if norm == "l2" else (100.0 * g).abs()
    for name, a in zip(names, acc):
        ref = a.sqrt() if norm == "l2" else a
        ref = ref.t() if family == "gpt2" else ref  # Conv1D stores (in, out)
        assert got[name].dtype == torch.float32 and got[name].shape == ref.shape
        torch.testing.assert_close(got[name].double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the model is left as it was


def test_gradient_cache_reloads_bit_exactly_and_is_hit_by_the_next_run(passes):
    dense = tiny_model("qwen2")
    ids = _ids()
    targets = SparsityConfig.uniform(0.6).resolve(layout(dense))
    runs = []
    for _ in range(2):
        model, pruner = copy.deepcopy(dense), GBLM()
        prune_model(model, pruner, targets, ids)
        runs.append((_weights(model), pruner.extra_stats(copy.deepcopy(dense), ids), pruner.details()))
    assert passes == [4]  # computed once, then three cache hits
    fresh = gradient_pass(copy.deepcopy(dense), ids)
    for name, g in fresh.items():
        assert torch.equal(runs[1][1][name], g), name
        assert torch.equal(runs[0][0][name], runs[1][0][name])
    first, second = runs[0][2], runs[1][2]
    assert first["gradient_cache"] == second["gradient_cache"] and second["gradient_pass_s"] is None
    GBLM(norm="l1").extra_stats(dense, ids)  # another norm, other ids, other weights: other files
    GBLM().extra_stats(dense, ids[:3])
    changed = copy.deepcopy(dense)
    changed.model.layers[0].mlp.up_proj.weight.data[0, 0] += 1.0
    GBLM().extra_stats(changed, ids)
    assert passes == [4, 4, 3, 4]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_cli_prunes_every_family_to_the_claimed_sparsity(family, pattern, tmp_path, tiny_tokenizer, calib_file):
    model_dir = tmp_path / "model"
    tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--method", "gblm", "--calib", str(calib_file), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--gblm-alpha", "2", "--gblm-norm", "l1", "--out", str(out)]
    argv += ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    settings = report["method_details"]
    assert (settings["alpha"], settings["norm"], settings["scale"]) == (2.0, "l1", 100.0)
    assert settings["gradient_cache"].endswith(".safetensors") and settings["gradient_pass_s"] > 0
    pruned, _, _ = load_model(str(out), "cpu")
    weights = _weights(pruned)
    for row in report["layers"]:
        w = weights[row["name"]]
        if pattern == "unstructured":
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), row["name"]  # ⌊c·p⌋ per output row
        else:
            assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), row["name"]
        assert row["actual_sparsity"] == 0.5


def test_cli_per_layer_config_and_bad_input(tmp_path, tiny_tokenizer, calib_file, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"sparsity": {"0": 0.25, "model.layers.1.mlp.down_proj": 0.75}, "default": 0.5}))
    out = tmp_path / "pruned"
    base = ["prune", "--model", str(model_dir), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32",
            "--device", "cpu", "--out", str(out)]
    assert main(base + ["--method", "gblm", "--config", str(config)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "prune_report.json").read_text())["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["actual_sparsity"] == 0.25
    assert rows["model.layers.1.mlp.down_proj"]["actual_sparsity"] == 0.75
    assert rows["model.layers.1.mlp.up_proj"]["actual_sparsity"] == 0.5
    capsys.readouterr()
    never = tmp_path / "never"
    bad = base[:-1] + [str(never), "--sparsity", "0.5"]
    assert main(bad + ["--method", "gblm", "--gblm-alpha", "-1"]) == 2
    assert "alpha must be a finite number >= 0" in capsys.readouterr().err
    assert main(bad + ["--method", "wanda", "--gblm-norm", "l1"]) == 2
    assert "only work with --method gblm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(bad + ["--method", "gblm", "--gblm-norm", "l3"])
    assert exc.value.code == 2 and "invalid choice: 'l3'" in capsys.readouterr().err
    assert not never.exists()
    with pytest.raises(ValueError, match="norm must be one of l2, l1"):
        make_pruner("gblm", norm="fro")


@pytest.mark.parametrize("pattern,alloc", [("unstructured", [0.8, 0.3, 0.7]), ("2:4", [0.75, 0.25, 0.5])])
def test_search_realizes_exactly_the_masks_of_one_shot_gblm(pattern, alloc, tmp_path, tiny_tokenizer, calib_file,
                                                             passes):
    model_dir = tmp_path / "model"
    tiny_model("llama", layers=3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    settings = SearchSettings(model=str(model_dir), budget="sparsity=0.5", pattern=pattern, pruner="gblm",
                              calib=str(calib_file), nsamples=4, seqlen=32, fitness_samples=2,
                              low_fidelity_samples=1, min_sparsity=0.2, max_sparsity=0.8)
    ws = Workspace(settings, tmp_path / "ws")
    alloc = ws.allocation(np.array(alloc))
    ws.realize(alloc)
    realized = _weights(ws.model)
    targets = ws.space.to_targets(alloc)
    calib = data.calibration_ids(ws.tokenizer, str(calib_file), 4, 32, 0)
    lay = layout(ws.model)
    for block in range(lay.num_blocks):
        # the search ranks each block on dense upstream inputs: one-shot GBLM of that block alone sees the same
        model, _, _ = load_model(str(model_dir), "cpu")
        only = {n: Target(targets[n] if lay.block_of(n) == block else 0.0, ws.m) for n in lay.projection_names()}
        prune_model(model, GBLM(), only, calib)
        pruned = _weights(model)
        for name in lay.projections[block]:
            assert torch.equal(pruned[name], realized[name]), name
            assert (pruned[name] == 0).sum().item() == expected_pruned(pruned[name].shape, only[name])
    assert passes == [4]  # one gradient pass, shared by the search's score cache and every one-shot run
