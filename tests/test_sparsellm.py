"""SparseLLM: T = 1 is SparseGPT, the element-wise updates are exact minimizers, the objective never rises."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_TEXT, tiny_model
from prunesearch.cli import main
from pruners.masks import Target
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import get_weight, layout
from pruners.sparsellm import (SparseLLM, act_fn, gate_update, gated_z_update, relu_z_update, scalar_z_update)
from pruners.targets import SparsityConfig


def _ids(n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _grid_argmin(f, lo: float, hi: float, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: the best of ``points`` grid values for every element (f broadcasts a column of grid values)."""
    best_z = best_f = None
    for grid in torch.linspace(lo, hi, points, dtype=torch.float64).split(2000):
        fz = f(grid.unsqueeze(1))
        i = fz.argmin(0)
        z, fmin = grid[i], fz.gather(0, i.unsqueeze(0)).squeeze(0)
        if best_f is None:
            best_z, best_f = z, fmin
        else:
            better = fmin < best_f
            best_z, best_f = torch.where(better, z, best_z), torch.where(better, fmin, best_f)
    return best_z, best_f


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_one_iteration_is_exactly_sparsegpt(family):
    config = SparsityConfig({"0": 0.7}, default=0.5)
    results = {}
    for method, options in (("sparsegpt", {}), ("sparsellm", {"iters": 1})):
        model = tiny_model(family)
        lay = layout(model)
        details = prune_model(model, make_pruner(method, **options), config.resolve(lay), _ids()).get("details")
        results[method] = {n: get_weight(lay.projections[lay.block_of(n)][n]).clone() for n in lay.projection_names()}
    assert details["blocks"][0]["mode"] == "sparsellm" and len(details["blocks"][0]["objective"]) == 1
    for name, w in results["sparsegpt"].items():
        assert torch.equal(results["sparsellm"][name], w), name
        assert torch.equal(results["sparsellm"][name] == 0, w == 0), name


def test_relu_z_update_is_the_grid_argmin():
    torch.manual_seed(0)
    m, p = torch.randn(400, dtype=torch.float64) * 2, torch.randn(400, dtype=torch.float64) * 2
    for alpha, gamma in ((5.0, 5.0), (0.1, 5.0), (5.0, 0.3)):
        z = relu_z_update(m, p, alpha, gamma)
        grid_z, grid_f = _grid_argmin(lambda v: alpha * (v - m) ** 2 + gamma * (p - v.clamp(min=0)) ** 2,
                                      -8.0, 8.0, 32001)
        fz = alpha * (z - m) ** 2 + gamma * (p - z.clamp(min=0)) ** 2
        assert (fz <= grid_f + 1e-12).all()  # never worse than any grid point
        torch.testing.assert_close(z, grid_z, atol=1e-3, rtol=0)  # and it is the same point (grid step 5e-4)


@pytest.mark.parametrize("name", ["gelu_new", "gelu", "silu"])
def test_scalar_z_solve_matches_a_fine_grid(name):
    act = act_fn(name)
    torch.manual_seed(1)
    m, p = torch.randn(120, dtype=torch.float64) * 2, torch.randn(120, dtype=torch.float64) * 2
    for alpha, gamma in ((5.0, 5.0), (0.1, 5.0), (5.0, 0.5)):  # (0.1, 5) makes the objective non-convex
        def f(v):
            return alpha * (v - m) ** 2 + gamma * (p - act(v)) ** 2

        z = scalar_z_update(act, m, p, alpha, gamma)
        grid_z, grid_f = _grid_argmin(f, -15.0, 15.0, 30001)
        assert (f(z) <= grid_f + 1e-9).all()
        torch.testing.assert_close(z, grid_z, atol=2e-3, rtol=0)


def test_gated_updates_are_minimizers():
    act = act_fn("silu")
    torch.manual_seed(2)
    m, s, p = (torch.randn(300, dtype=torch.float64) for _ in range(3))
    alpha, gamma = 5.0, 2.0
    z = gated_z_update(m, act(s), p, alpha, gamma)
    _, grid_f = _grid_argmin(lambda v: alpha * (v - m) ** 2 + gamma * (p - act(s) * v) ** 2, -10.0, 10.0, 20001)
    assert (alpha * (z - m) ** 2 + gamma * (p - act(s) * z) ** 2 <= grid_f + 1e-12).all()
    ms = torch.randn(300, dtype=torch.float64)

    def g(x):
        return alpha * (x - ms) ** 2 + gamma * (p - act(x) * z) ** 2

    new = gate_update(act, s, ms, z, p, alpha, gamma, lr=0.05, steps=3)
    assert (g(new) <= g(s)).all() and g(new).sum() < 0.9 * g(s).sum()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])  # gated SiLU, ReLU, GELU
def test_objective_never_rises_and_falls(family):
    model = tiny_model(family)
    lay = layout(model)
    pruner = make_pruner("sparsellm", iters=4)
    details = prune_model(model, pruner, SparsityConfig.uniform(0.7).resolve(lay), _ids())["details"]
    for block, record in details["blocks"].items():
        loss = record["objective"]
        assert len(loss) == 4
        for before, after in zip(loss, loss[1:]):
            assert after <= before * (1 + 1e-5) + 1e-9, (block, loss)
        assert loss[-1] < 0.5 * loss[0], (block, loss)
    assert details["alpha"] == details["beta"] == details["gamma"] == 5.0
    assert details["ffn"] == {"gated": family == "llama", "activation": lay.activation}


def _expected_zeros(shape, target: Target, blocksize: int = 128) -> int:
    rows, cols = shape
    if target.m:
        return rows * cols // target.m * target.n
    return sum(int(rows * (min(c + blocksize, cols) - c) * target.sparsity) for c in range(0, cols, blocksize))


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_family_meets_per_layer_targets_exactly(family, pattern):
    model = tiny_model(family)
    lay = layout(model)
    values = {"0": 0.75, "1": 0.5} if pattern == "2:4" else {"0": 0.6, "1": 0.8}
    targets = SparsityConfig(values, pattern=pattern).resolve(lay)
    prune_model(model, make_pruner("sparsellm", iters=2), targets, _ids())
    for name in lay.projection_names():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        target = targets[name]
        assert (w == 0).sum().item() == _expected_zeros(w.shape, target), name
        if target.m:
            assert ((w == 0).view(w.shape[0], -1, target.m).sum(-1) == target.n).all(), name
    assert torch.isfinite(model(_ids(1, 16)).logits).all()


def test_first_half_optimizes_only_the_first_blocks_identically():
    lays, runs = [], []
    for layers in ("all", "first-half"):
        model = tiny_model("llama", layers=4)
        lay = layout(model)
        details = prune_model(model, SparseLLM(iters=2, layers=layers), SparsityConfig.uniform(0.6).resolve(lay),
                              _ids())["details"]
        lays.append(lay)
        runs.append(details)
    assert [runs[1]["blocks"][i]["mode"] for i in range(4)] == ["sparsellm"] * 2 + ["sparsegpt"] * 2
    assert [runs[0]["blocks"][i]["mode"] for i in range(4)] == ["sparsellm"] * 4
    assert runs[1]["layers"] == "first-half"
    for name in lays[0].projection_names():
        if lays[0].block_of(name) < 2:  # same inputs, same treatment
            a = get_weight(lays[0].projections[lays[0].block_of(name)][name])
            b = get_weight(lays[1].projections[lays[1].block_of(name)][name])
            assert torch.equal(a, b), name


def test_non_finite_block_is_named():
    model = tiny_model("llama", layers=3)
    lay = layout(model)
    with torch.no_grad():
        get_weight(lay.projections[1]["model.layers.1.mlp.up_proj"])[0, 0] = float("nan")
    with pytest.raises(ValueError, match="block 1"):
        prune_model(model, SparseLLM(iters=2), SparsityConfig.uniform(0.5).resolve(lay), _ids())


def test_solves_retry_with_more_damping_and_log_it():
    pruner = SparseLLM()
    gram = torch.diag(torch.tensor([1.0, -1e-5]))  # indefinite: 1e-6 and 1e-5 of the mean diagonal are too little
    factor = pruner._cholesky(gram, 3, "refit x")
    assert torch.isfinite(factor).all()
    assert pruner.details()["damping_retries"] == [{"block": 3, "solve": "refit x", "damping": pytest.approx(1e-4)}]
    with pytest.raises(RuntimeError, match="block 3"):
        pruner._cholesky(torch.diag(torch.tensor([1.0, -1.0])), 3, "refit y")


def test_bad_hyperparameters_are_refused():
    for options, match in (({"iters": 0}, "iterations"), ({"alpha": 0.0}, "alpha"), ({"gamma": float("nan")}, "gamma"),
                           ({"layers": "odd"}, "layers")):
        with pytest.raises(ValueError, match=match):
            SparseLLM(**options)


def test_cli_prunes_with_sparsellm_and_reports_hyperparameters(tmp_path, tiny_tokenizer, capsys):
    model_dir, calib, out = tmp_path / "tiny", tmp_path / "calib.txt", tmp_path / "pruned"
    tiny_model("opt").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    calib.write_text(TINY_TEXT * 3)
    argv = ["prune", "--model", str(model_dir), "--method", "sparsellm", "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--pattern", "2:4", "--sparsellm-iters", "3",
            "--sparsellm-alpha", "0.1", "--sparsellm-layers", "first-half", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    details = report["method_details"]
    assert (details["iters"], details["alpha"], details["beta"], details["layers"]) == (3, 0.1, 5.0, "first-half")
    assert len(details["blocks"]["0"]["objective"]) == 3 and details["blocks"]["1"]["mode"] == "sparsegpt"
    lay = layout(AutoModelForCausalLM.from_pretrained(out))
    for name in lay.projection_names():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    wrong = ["prune", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--sparsellm-iters", "2",
             "--out", str(tmp_path / "x")]
    assert main(wrong) == 2
    assert "only work with --method sparsellm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
