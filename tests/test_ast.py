"""AST: sparse linear with adaptive masks, SR-STE, distillation, SLoRB, checkpoints, export and quantization."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from pruners.ast_export import finalize, load_ast_model, save_ast_model
from pruners.ast_trainer import ASTSettings, ASTTrainer, lr_at
from pruners.distill import distill_loss, kd_kl
from pruners.masks import Target
from pruners.quantize import quantize_model, rtn_quantize, size_report
from pruners.registry import get_weight, layout
from pruners.slorb import SLoRB
from pruners.sparse_linear import SparseLinear, srste_lambda
from pruners.targets import SparsityConfig
from prunesearch.cli import main


def _targets(model, pattern="2:4"):
    return SparsityConfig.uniform(None, pattern).resolve(layout(model))


def _ids(n=64, seqlen=24, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _groups_pruned(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.view(mask.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("family,n,m", [("llama", 2, 4), ("gpt2", 2, 4), ("opt", 4, 8)])
def test_refreshed_mask_keeps_exactly_n_of_every_m_largest_magnitudes(family, n, m):
    model = tiny_model(family)
    lay = layout(model)
    name = lay.projection_names()[0]
    layer = SparseLinear(lay.projections[0][name], Target(n / m, m))
    with torch.no_grad():
        layer.base.weight.add_(torch.randn_like(layer.base.weight))  # new dense weights → a different mask
    before = layer.mask.clone()
    flips = layer.refresh()
    w = layer.dense_weight().detach().abs()
    assert (_groups_pruned(layer.mask, m) == n).all()
    groups = w.view(w.shape[0], -1, m)
    kept_min = groups.masked_fill(layer.mask.view_as(groups), float("inf")).amin(-1)
    pruned_max = groups.masked_fill(~layer.mask.view_as(groups), -1.0).amax(-1)
    assert (pruned_max <= kept_min).all()  # the n smallest of each group are the pruned ones
    assert flips == int((before != layer.mask).sum()) > 0


def test_masks_refresh_exactly_every_k_steps_from_the_dense_weights():
    model = tiny_model("llama")
    settings = ASTSettings(steps=7, batch_size=4, mask_every=3, lr=5e-2, warmup=0.0)
    trainer = ASTTrainer(model, _targets(model), settings, _ids())
    layer = next(iter(trainer.layers.values()))
    refreshed = []
    for _ in range(settings.steps):
        mask = layer.mask.clone()
        record = trainer.train_step()
        if record.get("mask_refresh"):
            refreshed.append(record["step"])
            assert record["flip_rate"] > 0
            assert torch.equal(layer.mask, _magnitude_24(layer.dense_weight()))
        else:
            assert torch.equal(layer.mask, mask)  # untouched between refreshes
    assert refreshed == [3, 6]


def _magnitude_24(w):
    groups = w.detach().abs().view(w.shape[0], -1, 4)
    idx = groups.argsort(dim=-1, stable=True)[..., :2]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view_as(w)


def test_fixed_mask_never_changes_and_straight_through_gradient_reaches_pruned_weights():
    model = tiny_model("opt")
    trainer = ASTTrainer(model, _targets(model), ASTSettings(steps=2, batch_size=4, mask_every=0), _ids())
    layer = next(iter(trainer.layers.values()))
    mask = layer.mask.clone()
    x = torch.randn(3, layer.mask.shape[1])
    layer(x).sum().backward()
    dense_grad = torch.ones(3, layer.mask.shape[0]).t() @ x  # d/dW of sum((W⊙M)x) passed straight through
    assert torch.allclose(layer.base.weight.grad, dense_grad, atol=1e-5)
    assert (layer.base.weight.grad[mask] != 0).any()
    layer.base.weight.grad = None
    trainer.train_step(), trainer.train_step()
    assert torch.equal(layer.mask, mask) and not any("mask_refresh" in r for r in trainer.history)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_srste_decay_term_is_lambda_t_times_pruned_weights(family):
    model = tiny_model(family)
    lay = layout(model)
    layer = SparseLinear(next(iter(lay.projections[0].values())), Target(0.5, 4))
    steps, lam, ramp = 100, 1e-2, 0.25
    expected = {0: 0.0, 12: lam * 12 / 25, 25: lam, 80: lam}
    for t, lam_t in expected.items():
        assert srste_lambda(t, steps, lam, ramp) == pytest.approx(lam_t)
        grad = torch.randn_like(layer.base.weight)
        layer.base.weight.grad = grad.clone()
        layer.add_srste_decay(srste_lambda(t, steps, lam, ramp))
        pruned = layer.mask.t() if family == "gpt2" else layer.mask
        expected_grad = grad + lam_t * pruned * layer.base.weight.detach()
        assert torch.allclose(layer.base.weight.grad, expected_grad, rtol=0, atol=1e-7)
        assert torch.equal(layer.base.weight.grad[~pruned], grad[~pruned])  # kept weights: plain gradient
        if lam_t:
            assert (layer.base.weight.grad[pruned] * layer.base.weight.detach()[pruned]
                    >= grad[pruned] * layer.base.weight.detach()[pruned]).all()  # pushes pruned weights to 0


def test_kd_loss_equals_manual_computation_with_temperature_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    T = 2.0
    p_t = torch.softmax(teacher / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / T, -1))).sum(-1).mean() * T * T
    ce = -torch.log_softmax(student[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert kd_kl(student, teacher, T).item() == pytest.approx(kl.item(), rel=1e-5)
    loss, parts = distill_loss(student, teacher, ids, 0.33, 0.67, T)
    assert loss.item() == pytest.approx(0.33 * ce.item() + 0.67 * kl.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert kd_kl(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("trainable,cols", [(False, 64), (True, 64), (False, 72)])
def test_slorb_mean_init_restores_the_pruned_contribution_for_groupwise_constant_inputs(trainable, cols):
    torch.manual_seed(0)
    rows, k = 12, 16
    linear = torch.nn.Linear(cols, rows)
    layer = SparseLinear(linear, Target(0.5, 4))
    layer.slorb = SLoRB.from_pruned(layer.dense_weight(), layer.mask, k, trainable)
    groups = -(-cols // k)  # 72 columns: four groups of 16 and a last one of 8
    x = torch.randn(5, groups).repeat_interleave(k, dim=1)[:, :cols]  # constant within every group
    with torch.no_grad():
        assert torch.allclose(layer(x), linear(x), atol=1e-5)
        y = torch.randn(5, cols)  # otherwise it is only an approximation
        assert not torch.allclose(layer(y), linear(y), atol=1e-3)
    assert layer.slorb.num_parameters() == rows * groups + (groups * cols if trainable else 0)


def _trained(family, slorb_k=16, steps=2):
    model = tiny_model(family)
    settings = ASTSettings(steps=steps, batch_size=4, mask_every=1, slorb_k=slorb_k, lr=1e-2)
    trainer = ASTTrainer(model, _targets(model), settings, _ids())
    trainer.train(progress=False)
    return model, trainer, _targets(tiny_model(family))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_then_load_reproduces_logits_and_from_pretrained_gives_the_exact_pattern(family, tmp_path):
    model, trainer, _ = _trained(family)
    x = _ids(3, 16, seed=1)
    model.eval()
    with torch.no_grad():
        before = model(x).logits
    slorb_params = trainer.slorb_parameters()
    slorbs = finalize(model, trainer.layers)
    save_ast_model(model, None, slorbs, tmp_path)
    loaded, _ = load_ast_model(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, before, atol=1e-6)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert not torch.allclose(plain(x).logits, before, atol=1e-3)  # SLoRB matters
    meta = json.loads((tmp_path / "slorb.json").read_text())
    assert meta["parameters"] == slorb_params == sum(
        layout(plain).numel(n) for n in layout(plain).projection_names()) // 16
    for name in layout(plain).projection_names():
        w = get_weight(layout(plain).projections[layout(plain).block_of(name)][name])
        assert (_groups_pruned(w == 0, 4) == 2).all(), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resume_from_a_checkpoint_reproduces_the_next_steps(family, tmp_path):
    settings = ASTSettings(steps=5, batch_size=4, mask_every=2, slorb_k=16, lr=1e-2, srste_lambda=1e-1)
    model = tiny_model(family)
    targets = _targets(model)
    first = ASTTrainer(model, targets, settings, _ids())
    first.train_step(), first.train_step(), first.train_step()
    first.save_checkpoint(tmp_path / "ckpt")
    expected = [first.train_step()["loss"], first.train_step()["loss"]]
    second = ASTTrainer(tiny_model(family), targets, settings, _ids())
    second.load_checkpoint(tmp_path / "ckpt")
    assert second.step == 3 and len(second.history) == 3
    assert [second.train_step()["loss"], second.train_step()["loss"]] == expected
    other = ASTTrainer(tiny_model(family), targets, ASTSettings(steps=6, batch_size=4), _ids())
    with pytest.raises(ValueError, match="other settings"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_gradient_checkpointing_and_the_hidden_state_term_train_identically():
    losses = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        settings = ASTSettings(steps=2, batch_size=4, a_hidden=1.0, gradient_checkpointing=checkpointing)
        trainer = ASTTrainer(model, _targets(model), settings, _ids())
        losses.append([(r["loss"], r["hidden"]) for r in trainer.train(progress=False)])
    assert losses[0] == losses[1] and losses[0][0][1] > 0


def test_learning_rate_warms_up_then_decays_to_min_lr():
    s = ASTSettings(steps=100, lr=1e-3, warmup=0.1)
    assert lr_at(0, s) == pytest.approx(1e-4) and lr_at(9, s) == pytest.approx(1e-3)
    assert lr_at(99, s) == pytest.approx(1e-4)
    assert lr_at(10, s) > lr_at(50, s) > lr_at(90, s)


def test_rtn_quantization_keeps_the_pattern_and_uses_at_most_2_to_the_bits_levels_per_group():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    pruned = _magnitude_24(w)
    q = rtn_quantize(w, pruned, 4, 16)
    assert (q[pruned] == 0).all()
    assert (q[~pruned] != 0).float().mean() > 0.9
    for group in q.view(8, 4, 16):
        for row in group:
            assert row.unique().numel() <= 16
    assert (q - w.masked_fill(pruned, 0)).abs().max() < (w.abs().max() / 15)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_sparse_model_keeps_its_pattern_and_size_is_counted_in_bits(method):
    model, trainer, targets = _trained("llama", slorb_k=0)
    finalize(model, trainer.layers)
    lay = layout(model)
    before = {n: get_weight(lay.projections[lay.block_of(n)][n]).clone() for n in lay.projection_names()}
    quantize_model(model, targets, method, 4, 32, _ids(8) if method == "gptq" else None)
    for name, w0 in before.items():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        assert (w[w0 == 0] == 0).all() and (_groups_pruned(w != 0, 4) <= 2).all()
        assert not torch.equal(w, w0)
        groups = w.view(w.shape[0], -1, 32) if method == "rtn" else w.unsqueeze(1)
        assert max(g.unique().numel() for row in groups for g in row) <= 16  # 16 levels, 0 among them
    size = size_report(model, targets, 4, 32 if method == "rtn" else 0)
    weights = sum(w.numel() for w in before.values())
    kept = sum(int((w != 0).sum()) for w in before.values())
    assert size["projection_bits"]["fp32"] == 32 * weights
    assert size["projection_bits"]["metadata"] == 2 * kept
    assert kept == weights // 2
    assert size["projection_bits"]["values"] == 4 * kept
    scale_groups = sum(w.shape[0] * (w.shape[1] // 32 if method == "rtn" else 1) for w in before.values())
    assert size["projection_bits"]["scales_zeros"] == scale_groups * 20


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen2", "gpt_neox"])
def test_cli_trains_exports_and_the_model_reloads(family, tmp_path, tiny_tokenizer, calib_file):
    model_dir = tmp_path / family
    tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ast"
    argv = ["ast", "--model", str(model_dir), "--pattern", "2:4", "--steps", "3", "--batch-size", "2",
            "--seqlen", "16", "--calib", str(calib_file), "--nsamples", "4", "--mask-every", "2", "--slorb-k", "16",
            "--wbits", "4", "--device", "cpu", "--save-every", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "ast_report.json").read_text())
    assert [r["step"] for r in report["history"]] == [1, 2, 3]
    assert report["history"][1]["mask_refresh"] and "flip_rate" in report["history"][1]
    assert report["slorb_parameters"] > 0 and report["size"]["model_ratio_vs_fp32"] > 1
    model, _ = load_ast_model(out)
    plain = AutoModelForCausalLM.from_pretrained(out)
    for name in layout(plain).projection_names():
        w = get_weight(layout(plain).projections[layout(plain).block_of(name)][name])
        assert (_groups_pruned(w != 0, 4) <= 2).all(), name
    x = torch.randint(0, 320, (1, 8))
    assert torch.isfinite(model(x).logits).all()
    assert main(argv) == 2  # --out exists: refused, nothing touched
    assert main(argv + ["--resume"]) == 0  # already at the last step: exports again


def test_cli_per_layer_unstructured_config_keeps_each_layers_target(tmp_path, tiny_tokenizer, calib_file):
    model_dir = tmp_path / "llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    config = tmp_path / "best_config.json"
    config.write_text(json.dumps({"sparsity": {"0": 0.25, "model.layers.1.mlp.down_proj": 0.75}, "default": 0.5}))
    out = tmp_path / "ast"
    assert main(["ast", "--model", str(model_dir), "--config", str(config), "--steps", "2", "--batch-size", "2",
                 "--seqlen", "16", "--calib", str(calib_file), "--mask-every", "1", "--kd", "0.5,0.5",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    lay = layout(plain)
    for name in lay.projection_names():
        w = get_weight(lay.projections[lay.block_of(name)][name])
        p = 0.25 if lay.block_of(name) == 0 else 0.75 if name.endswith("down_proj") else 0.5
        assert ((w == 0).sum(1) == int(w.shape[1] * p)).all(), name


def test_cli_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, calib_file):
    out = tmp_path / "never"
    base = ["ast", "--model", str(tmp_path / "missing"), "--steps", "2", "--out", str(out)]
    assert main(base + ["--kd", "0.5"]) == 2
    assert "--kd" in capsys.readouterr().err
    assert main(base + ["--wbits", "9"]) == 2
    assert main(base + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not out.exists()
