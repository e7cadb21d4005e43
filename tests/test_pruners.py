"""Exactness of the one-shot pruners against naive reference computations."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from pruners.magnitude import Magnitude
from pruners.masks import Target, expected_pruned, nm_mask, parse_pattern
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import get_weight, layout
from pruners.sparsegpt import sparsegpt
from pruners.targets import SparsityConfig
from pruners.walker import InputStats, collect_stats, run_block, walk
from pruners.wanda import Wanda


def _stats(x: torch.Tensor, full: bool = True) -> InputStats:
    s = InputStats(x.shape[-1], full, torch.float64)
    s.add(x.double())
    return s


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_wanda_prunes_floor_cp_per_row_and_matches_naive_argsort(p):
    torch.manual_seed(0)
    w, x = torch.randn(24, 37), torch.randn(4, 50, 37)
    new = Wanda().prune(w, _stats(x, full=False), Target(p))
    norms = (x.double() ** 2).sum((0, 1)) / 4
    score = w.abs().double() * norms.sqrt()
    k = math.floor(37 * p)
    for r in range(24):
        naive = set(torch.argsort(score[r], stable=True)[:k].tolist())
        assert set(torch.nonzero(new[r] == 0).flatten().tolist()) == naive
    assert (new == 0).sum().item() == 24 * k == expected_pruned((24, 37), Target(p))
    kept = new != 0
    assert torch.equal(new[kept], w[kept])  # Wanda never updates weights


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_groups_are_exact(pattern):
    torch.manual_seed(1)
    m = parse_pattern(pattern)
    n = int(pattern.split(":")[0])
    score = torch.randn(16, 64).abs()
    mask = nm_mask(score, n, m)
    assert (mask.view(16, -1, m).sum(-1) == n).all()
    groups = score.view(16, -1, m)
    pruned_max = torch.where(mask.view_as(groups), groups, -1).amax(-1)
    kept_min = torch.where(~mask.view_as(groups), groups, 1e9).amin(-1)
    assert (pruned_max <= kept_min).all()  # the n pruned are the n lowest of each group


def test_magnitude_unstructured_is_per_layer_and_nm_per_row():
    torch.manual_seed(2)
    w = torch.randn(10, 20)
    new = Magnitude().prune(w, None, Target(0.6))
    assert (new == 0).sum().item() == 120
    thresh = w.abs().flatten().sort().values[119]
    assert torch.equal(new == 0, w.abs() <= thresh)
    assert ((Magnitude().prune(w, None, Target(0.5, 4)) == 0).view(10, 5, 4).sum(-1) == 2).all()


def test_statistics_do_not_depend_on_batching(tiny_tokenizer):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (8, 24), generator=torch.Generator().manual_seed(0))
    lay = layout(model)
    results = {}
    for batch_size in (1, 8):
        collected = {}

        def visit(i, block, batches, collected=collected):
            with collect_stats(lay.projections[i], full=True, dtype=torch.float64) as stats:
                run_block(block, batches)
            collected.update(stats)

        walk(model, ids, visit, batch_size=batch_size)
        results[batch_size] = collected
    for name in lay.projection_names():
        a, b = results[1][name], results[8][name]
        assert a.nseq == b.nseq == 8
        torch.testing.assert_close(a.norm_sq, b.norm_sq, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-7)


def _naive_obs(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Sequential OBS: zero each masked column in turn and update the rest through the shrinking inverse."""
    w = w.clone().double()
    h = h.clone().double()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    for j in range(w.shape[1]):
        q = w[:, j].masked_fill(mask[:, j], 0)
        err = (w[:, j] - q) / hinv[j, j]
        w -= err.unsqueeze(1) * hinv[j].unsqueeze(0)
        w[:, j] = q
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return w


def test_sparsegpt_blocked_update_equals_naive_sequential_obs():
    torch.manual_seed(3)
    x = torch.randn(200, 48, dtype=torch.float64)
    h = 2 * x.t() @ x / 200
    w = torch.randn(12, 48, dtype=torch.float64)
    mask = torch.rand(12, 48) < 0.5
    blocked, used, _ = sparsegpt(w, h, Target(0.5), blocksize=16, mask=mask)
    assert torch.equal(used, mask)
    torch.testing.assert_close(blocked, _naive_obs(w, h, mask), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("target", [Target(0.5), Target(0.7), Target(0.5, 4)])
def test_sparsegpt_reconstructs_better_than_its_mask_alone(target):
    torch.manual_seed(4)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs, where reconstruction matters
    w = torch.randn(32, 64)
    new, mask, _ = sparsegpt(w, _stats(x).hessian, target)
    assert (new == 0).sum().item() >= expected_pruned((32, 64), target)
    assert torch.equal(new == 0, mask | (w == 0))
    err_sparsegpt = torch.linalg.norm(x.double() @ (w.double() - new.double()).t())
    err_mask_only = torch.linalg.norm(x.double() @ (w.double() * mask).t())
    assert err_sparsegpt < 0.95 * err_mask_only
    if target.m:
        assert (mask.view(32, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_joint_quantization_keeps_the_pattern_on_a_4bit_grid():
    torch.manual_seed(5)
    x, w = torch.randn(256, 32), torch.randn(16, 32)
    new, mask, _ = sparsegpt(w, _stats(x).hessian, Target(0.5, 4), wbits=4)
    assert (mask.view(16, -1, 4).sum(-1) == 2).all() and bool((new[mask] == 0).all())
    for r in range(16):
        assert new[r].unique().numel() <= 16 + 1


def test_config_precedence_default_and_errors():
    model = tiny_model("llama", layers=3)
    lay = layout(model)
    cfg = SparsityConfig({"0": 0.6, "model.layers.0.mlp.down_proj": 0.7, "2": 0.0}, default=0.5)
    t = cfg.resolve(lay)
    assert t["model.layers.0.self_attn.q_proj"].sparsity == 0.6
    assert t["model.layers.0.mlp.down_proj"].sparsity == 0.7
    assert t["model.layers.1.mlp.up_proj"].sparsity == 0.5
    assert t["model.layers.2.self_attn.o_proj"].sparsity == 0.0
    no_default = SparsityConfig({"1": 0.4}).resolve(lay)
    assert no_default["model.layers.0.self_attn.q_proj"].sparsity == 0.0
    with pytest.raises(ValueError, match="does not have"):
        SparsityConfig({"7": 0.5}).resolve(lay)
    with pytest.raises(ValueError, match="does not have"):
        SparsityConfig({"model.layers.0.mlp.nope": 0.5}).resolve(lay)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparsityConfig({"0": 1.0})
    with pytest.raises(ValueError, match="multiple of 1/4"):
        SparsityConfig({"0": 0.6}, pattern="2:4")
    with pytest.raises(ValueError, match="0 < N < M"):
        SparsityConfig.uniform(pattern="4:4")


def test_per_layer_nm_levels_are_realized():
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = SparsityConfig({"0": 0.25, "1": 0.75}, pattern="4:8")
    targets = cfg.resolve(layout(model))
    prune_model(model, make_pruner("wanda"), targets, ids)
    for name, module in layout(model).projections[1].items():
        w = get_weight(module)
        assert ((w == 0).view(w.shape[0], -1, 8).sum(-1) == 6).all(), name
    for name, module in layout(model).projections[0].items():
        w = get_weight(module)
        assert ((w == 0).view(w.shape[0], -1, 8).sum(-1) == 2).all(), name
