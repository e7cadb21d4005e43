"""``--width-score taylor``: Σ |W ⊙ ∂L/∂W| over each key/value group's and MLP channel's weights, checked against
autograd on a float64 copy with the heads indexed by hand, and used by the search and by ``prune --method width``."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from conftest import saved_tiny_model, tiny_model
from pruners.width.importance import importance
from prunesearch.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def _mean_loss_gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂L/∂W of every parameter for L the causal-LM loss of each sequence (written out), averaged over them."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    losses = []
    for seq in ids:
        logits = ref(input_ids=seq.unsqueeze(0)).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, seq[1:]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))
    return {n: (p.detach() * g).abs() for (n, p), g in zip(params.items(), grads)}  # |W ⊙ G|


def _llama_reference(sal: dict[str, torch.Tensor], i: int, hd: int = 16, group: int = 2):
    """LLaMA (GQA: 2 key/value heads of 2 query heads, head size 16): rows and columns picked per group by hand."""
    p = f"model.layers.{i}."
    q, k, v = (sal[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
    o = sal[p + "self_attn.o_proj.weight"]
    groups = []
    for g in range(2):
        heads = slice(g * group * hd, (g + 1) * group * hd)
        kv = slice(g * hd, (g + 1) * hd)
        groups.append(q[heads].sum() + k[kv].sum() + v[kv].sum() + o[:, heads].sum())
    channels = (sal[p + "mlp.gate_proj.weight"].sum(1) + sal[p + "mlp.up_proj.weight"].sum(1)
                + sal[p + "mlp.down_proj.weight"].sum(0))
    return torch.stack(groups), channels


def _gpt2_reference(sal: dict[str, torch.Tensor], i: int, hidden: int = 64, hd: int = 16):
    """GPT-2 (Conv1D weights stored in x out; fused c_attn columns [q | k | v]; every head its own group)."""
    p = f"transformer.h.{i}."
    attn, proj = sal[p + "attn.c_attn.weight"], sal[p + "attn.c_proj.weight"]
    groups = [sum(attn[:, part * hidden + h * hd: part * hidden + (h + 1) * hd].sum() for part in range(3))
              + proj[h * hd:(h + 1) * hd].sum() for h in range(4)]
    channels = sal[p + "mlp.c_fc.weight"].sum(0) + sal[p + "mlp.c_proj.weight"].sum(1)
    return torch.stack(groups), channels


@pytest.mark.parametrize("family,reference", [("llama", _llama_reference), ("gpt2", _gpt2_reference)])
def test_taylor_scores_equal_autograd_on_a_float64_copy(family, reference):
    model = tiny_model(family, layers=2)
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    imp = importance(model, ids, "taylor", batch_size=2)
    sal = _mean_loss_gradients(model, ids)
    for i in range(2):
        groups, channels = reference(sal, i)
        assert imp.groups[i].shape == groups.shape and imp.channels[i].shape == channels.shape
        torch.testing.assert_close(imp.groups[i], groups, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(imp.channels[i], channels, rtol=1e-4, atol=1e-9)
    assert imp.metric == "taylor" and all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_search_and_prune_with_taylor_scores(tiny_llama_dir, tiny_calib_file, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    common = ["--model", str(tiny_llama_dir), "--calib", str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32",
              "--device", "cpu"]
    assert main(["search", "--space", "width", "--budget", "params=75%", "--width-score", "taylor", *common,
                 "--fitness-samples", "6", "--low-fidelity-samples", "2", "--report-ppl=", "--quiet", "--trials",
                 "5", "--out", str(run)]) == 0
    frame = pd.read_parquet(run / "trials.parquet")
    assert (frame["state"] == "COMPLETE").sum() >= 2 and list(frame["label"][:2]) == ["uniform-width", "flap"]
    config = json.loads((run / "best_config.json").read_text())
    assert config["meta"]["width_score"] == "taylor"
    assert json.loads((run / "space.json").read_text())["width_score"] == "taylor"

    gpt2 = saved_tiny_model(tmp_path / "tiny-gpt2", tiny_tokenizer, "gpt2")
    out = tmp_path / "pruned"
    assert main(["prune", "--method", "width", "--width", "0.5", "--width-score", "taylor", *common[2:],
                 "--model", str(gpt2), "--out", str(out)]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["score"] == "taylor" and [r["heads"] for r in report["layers"]] == [2, 2]

