"""Width pruning: unit scores against naive computations, masking equals slicing, GQA shapes, exports that reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from pruners.registry import get_weight
from pruners.width.allocation import from_config, global_ranking, uniform
from pruners.width.counting import shapes
from pruners.width.geometry import BlockWidth, geometry, sub
from pruners.width.importance import importance
from pruners.width.slicing import realize, slice_block

IDS = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ragged(geom) -> list[BlockWidth]:
    """Block 0 keeps one key/value group and 40% of its channels, block 1 everything but 3 channels."""
    w0, w1 = geom.widths
    return [BlockWidth(geom.group, 1, int(0.4 * w0.intermediate)),
            BlockWidth(w1.heads, w1.kv_heads, w1.intermediate - 3)]


@pytest.mark.parametrize("metric", ["wanda", "flap"])
def test_scores_match_naive_per_column_sums(metric):
    model = tiny_model("llama")
    geom = geometry(model)
    seen = {}
    hooks = [sub(b, p).register_forward_hook(lambda m, inp, out, k=(i, p): seen.setdefault(k, []).append(inp[0]))
             for i, b in enumerate(geom.layout.blocks) for p in (geom.heads.out, geom.ffn.down)]
    _logits(model)
    for h in hooks:
        h.remove()
    imp = importance(model, IDS, metric, batch_size=2)
    for i, block in enumerate(geom.layout.blocks):
        for path, got, span in ((geom.heads.out, imp.groups[i], geom.group * geom.head_dim),
                                (geom.ffn.down, imp.channels[i], 1)):
            x = torch.cat(seen[(i, path)]).reshape(-1, get_weight(sub(block, path)).shape[1]).double()
            w = get_weight(sub(block, path)).double()
            if metric == "wanda":
                col = (w.abs() * x.norm(dim=0)).sum(0)
            else:
                col = x.var(dim=0) * (w ** 2).sum(0)
            torch.testing.assert_close(got, col.view(-1, span).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(imp.means[i][1], torch.cat(seen[(i, geom.ffn.down)]).reshape(-1, 128).double()
                                   .mean(0), rtol=1e-9, atol=1e-12)
    top = imp.keep(0, 1, 5)
    assert top[0] == [int(imp.groups[0].argmax())]
    assert set(top[1]) == set(torch.topk(imp.channels[0], 5).indices.tolist())


@pytest.fixture(params=["llama", "qwen2", "opt", "gpt2"])
def family(request) -> str:
    """The families width pruning slices (GPT-NeoX's interleaved fused query_key_value is refused, tested below)."""
    return request.param


def test_a_family_without_head_layout_is_refused_naming_the_registry():
    with pytest.raises(ValueError, match="pruners/registry.py"):
        importance(tiny_model("gpt_neox"), IDS, "wanda", batch_size=4)


@pytest.mark.parametrize("compensate", [False, True])
def test_masking_and_slicing_give_identical_outputs(family, compensate):
    dense = tiny_model(family)
    imp = importance(dense, IDS, "flap", batch_size=2)
    widths = _ragged(geometry(dense))
    if compensate and family == "qwen2":  # its o_proj/down_proj have no bias and no flag to add one
        with pytest.raises(ValueError, match="bias compensation needs biases.*qwen2 models have none"):
            realize(tiny_model(family), widths, imp, bias_compensation=True)
        return
    masked, sliced = tiny_model(family), tiny_model(family)
    realize(masked, widths, imp, bias_compensation=compensate, mask=True)
    geom = realize(sliced, widths, imp, bias_compensation=compensate)
    assert geom.widths == widths == geometry(sliced).widths
    torch.testing.assert_close(_logits(sliced), _logits(masked), atol=1e-5, rtol=0)
    assert (_logits(sliced) - _logits(dense)).abs().max() > 1e-3  # something was really removed
    n = sum(p.numel() for p in sliced.parameters())
    assert n < sum(p.numel() for p in dense.parameters())
    s = shapes(masked, geometry(masked))
    assert n == sum(p.numel() for p in masked.parameters()) - sum(
        s.block_params(a) - s.block_params(b) for a, b in zip(geometry(dense).widths, widths))
    if compensate:  # the removed units' mean contribution moved into the biases: closer to dense than without
        plain = tiny_model(family)
        realize(plain, widths, imp)
        reference = _logits(dense)
        assert ((_logits(sliced) - reference) ** 2).mean() < ((_logits(plain) - reference) ** 2).mean()


def test_gqa_shapes_after_removing_key_value_groups():
    model = tiny_model("llama")
    geom = geometry(model)
    slice_block(geom, 0, [1], list(range(0, 128, 2)))
    attn = model.model.layers[0].self_attn
    hd = geom.head_dim
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (2 * hd, hd, hd)
    assert attn.o_proj.in_features == 2 * hd and attn.num_key_value_groups == 2
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    assert _logits(model, IDS[:, :5]).shape == (4, 5, 320)
    out = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)  # KV cache at new widths
    assert out.shape == (1, 7)


def test_zero_width_and_bad_configs_are_clear_errors():
    model = tiny_model("llama")
    geom = geometry(model)
    with pytest.raises(ValueError, match="block 1 would keep no attention heads"):
        slice_block(geom, 1, [], [0])
    with pytest.raises(ValueError, match="heads must be a multiple of 2"):
        from_config(geom, {"0": {"heads": 3}})
    with pytest.raises(ValueError, match="intermediate must be in"):
        from_config(geom, {"1": {"intermediate": 0}})
    assert from_config(geom, {"1": {"heads": 2}})[1] == BlockWidth(2, 1, 128)
    assert uniform(geom, 0.75) == [BlockWidth(4, 2, 96)] * 2 and uniform(geom, 0.01) == [BlockWidth(2, 1, 1)] * 2


def test_global_ranking_removes_the_share_of_block_parameters():
    model = tiny_model("gpt2", layers=3)
    geom = geometry(model)
    s = shapes(model, geom)
    imp = importance(model, IDS, "flap", batch_size=2)
    dense = sum(s.block_params(w) for w in geom.widths)
    for share in (0.2, 0.35):
        widths = global_ranking(geom, imp, s, share)
        removed = dense - sum(s.block_params(w) for w in widths)
        assert share * dense <= removed < share * dense + max(s.group_params(), s.channel_params())
        assert all(w.kv_heads >= 1 and w.intermediate >= 1 for w in widths)


def _save(model, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_export_round_trip_through_both_loaders(family, tiny_tokenizer, tmp_path):
    from prunesearch.models import load_model

    model = tiny_model(family)
    widths = _ragged(geometry(model))
    realize(model, widths, importance(model, IDS, "wanda", batch_size=4), bias_compensation=family != "qwen2")
    before = _logits(model)
    _save(model, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"prunesearch_{family}"
    assert config["layer_heads"] == [w.heads for w in widths]
    assert config["layer_kv_heads"] == [w.kv_heads for w in widths]
    assert config["layer_intermediate"] == [w.intermediate for w in widths]
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in auto.parameters()) == sum(p.numel() for p in model.parameters())
    ours, _, _ = load_model(str(tmp_path), dtype="float32")
    for loaded in (auto, ours):
        assert geometry(loaded).widths == widths
        torch.testing.assert_close(_logits(loaded), before, atol=0, rtol=0)
    assert geometry(AutoModelForCausalLM.from_config(auto.config)).widths == widths  # fresh weights, same shapes


def test_fresh_interpreter_registers_cheaply_and_loads(tiny_tokenizer, tmp_path):
    model = tiny_model("qwen2")
    realize(model, _ragged(geometry(model)), importance(model, IDS, "flap", batch_size=4))
    _save(model, tiny_tokenizer, tmp_path)
    expected = _logits(model, IDS[:1]).sum().item()
    code = ("import sys, prunesearch; assert 'torch' not in sys.modules, 'import prunesearch loaded torch'\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            f"print(type(m).__name__, m(input_ids=torch.tensor({IDS[:1].tolist()})).logits.sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    name, value = out.stdout.split()
    assert name == "PrunesearchQwen2ForCausalLM"
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_counts_match_the_sliced_model_and_an_independent_flop_count(family):
    from torch.utils.flop_counter import FlopCounterMode

    from conftest import tiny_config
    from pruners.width.counting import flops_per_token, memory_bytes, params

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").eval()
    geom = geometry(model)
    s = shapes(model, geom)
    widths = _ragged(geom)
    assert params(s, geom.widths) == sum(p.numel() for p in model.parameters())
    realize(model, widths, importance(model, IDS, "flap", batch_size=4))
    assert params(s, widths) == sum(p.numel() for p in model.parameters())
    seqlen = 24
    ids = IDS[:1].repeat(1, 2)[:, :seqlen]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids)
    assert flops_per_token(s, widths, seqlen) * seqlen == counter.get_total_flops()
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    mem = memory_bytes(s, widths, context=seqlen)
    assert mem["kv_cache"] == kv and mem["weights"] == 4 * params(s, widths)


def test_uniform_at_a_parameter_share_gives_every_block_the_same_width_on_target():
    from pruners.width.allocation import uniform_params

    model = tiny_model("llama", layers=3)
    geom = geometry(model)
    s = shapes(model, geom)
    dense = s.block_params(geom.widths[0])
    for share, kv in ((0.2, 2), (0.35, 1)):
        widths = uniform_params(geom, s, share)
        assert len(set(widths)) == 1 and widths[0].kv_heads == kv
        kept = s.block_params(widths[0])
        assert (1 - share) * dense <= kept < (1 - share) * dense + s.channel_params()
