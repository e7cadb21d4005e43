"""The perplexity and KL routines against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from prunesearch.evaluate import DenseReference, perplexity, windows


class TableLM(nn.Module):
    """A 'model' whose next-token distribution depends only on the current token: a fixed logit table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation_with_window_cut_and_remainder_dropped():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    ids = torch.tensor([[0, 1, 2, 3, 4, 0, 2, 4, 1, 3, 2]])  # 11 tokens, seqlen 4: two windows, 3 dropped
    logp = torch.log_softmax(table.double(), -1)
    win_nll = []
    for w in ([0, 1, 2, 3], [4, 0, 2, 4]):
        win_nll.append(-sum(logp[w[i], w[i + 1]].item() for i in range(3)) / 3)
    expected = math.exp(sum(win_nll) / 2)
    assert windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 0, 2, 4]]
    assert perplexity(TableLM(table), ids, seqlen=4, batch_size=1) == pytest.approx(expected, rel=1e-6)
    assert perplexity(TableLM(table), ids, seqlen=4, batch_size=2) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(TableLM(table), ids, seqlen=12)


def test_kl_full_and_topk_against_hand_computation(tmp_path):
    torch.manual_seed(1)
    dense, student = torch.randn(6, 6), torch.randn(6, 6)
    ids = torch.randint(0, 6, (3, 5))
    ref = DenseReference.compute(TableLM(dense), ids, batch_size=2)
    p = torch.softmax(dense.double(), -1)[ids]
    q = torch.softmax(student.double(), -1)[ids]
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert ref.kl(TableLM(student), batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert ref.kl(TableLM(dense)) == pytest.approx(0.0, abs=1e-6)
    ref.save(tmp_path / "ref.safetensors")
    assert DenseReference.load(tmp_path / "ref.safetensors").kl(TableLM(student)) == pytest.approx(expected, rel=1e-5)

    top = DenseReference.compute(TableLM(dense), ids, topk=2)
    idx = p.topk(2, -1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    pk = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qk = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    coarse = (pk * (pk.log() - qk.log())).sum(-1).mean().item()
    assert top.kl(TableLM(student)) == pytest.approx(coarse, rel=1e-4)
    assert top.kl(TableLM(student)) <= expected + 1e-6  # coarsening never increases the KL


def test_kl_of_a_real_model_to_itself_is_zero_and_grows_with_pruning():
    from pruners.oneshot import make_pruner, prune_model
    from pruners.registry import layout
    from pruners.targets import SparsityConfig

    model = tiny_model("llama")
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = DenseReference.compute(model, ids)
    assert ref.kl(model) == pytest.approx(0.0, abs=1e-6)
    kls = []
    for p in (0.3, 0.7):
        pruned = tiny_model("llama")
        prune_model(pruned, make_pruner("magnitude"), SparsityConfig.uniform(p).resolve(layout(pruned)))
        kls.append(ref.kl(pruned))
    assert 0 < kls[0] < kls[1]


def test_hidden_size_reference_gives_the_full_vocabulary_kl_on_every_family(family, tmp_path):
    from pruners.oneshot import make_pruner, prune_model
    from pruners.registry import layout
    from pruners.targets import SparsityConfig

    dense = tiny_model(family)
    ids = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(0))
    ref = DenseReference.compute(dense, ids, batch_size=2)
    assert ref.expected is not None and ref.expected.shape == (5, 16, dense.config.hidden_size)
    full = DenseReference(ids, torch.log_softmax(dense(input_ids=ids).logits.detach().double(), -1).float())
    student = tiny_model(family)
    prune_model(student, make_pruner("magnitude"), SparsityConfig.uniform(0.6).resolve(layout(student)))
    expected = full.kl(student, batch_size=5)
    assert expected > 1e-3
    assert ref.kl(student, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert ref.kl(dense) == pytest.approx(0.0, abs=1e-5)
    ref.save(tmp_path / "ref.safetensors")
    assert DenseReference.load(tmp_path / "ref.safetensors").kl(student) == pytest.approx(expected, rel=1e-4)


def test_one_pass_scores_equal_perplexity_and_kl_computed_apart(family):
    from pruners.oneshot import make_pruner, prune_model
    from pruners.registry import layout
    from pruners.targets import SparsityConfig
    from prunesearch.evaluate import window_nll

    dense = tiny_model(family)
    ids = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(1))
    student = tiny_model(family)
    prune_model(student, make_pruner("magnitude"), SparsityConfig.uniform(0.6).resolve(layout(student)))
    for ref in (DenseReference.compute(dense, ids, batch_size=2), DenseReference.compute(dense, ids, topk=4)):
        nll, kl = ref.nll_and_kl(student, batch_size=2)
        assert torch.allclose(nll, window_nll(student, ids, batch_size=3), rtol=1e-5)
        assert kl == pytest.approx(ref.kl(student, batch_size=3), rel=1e-5)
        assert kl > 0 and nll.shape == (5,)


def test_cached_reference_loads_the_dense_model_only_when_nothing_is_saved(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    loads = []

    def loader():
        loads.append(1)
        return model

    path = tmp_path / "ref.safetensors"
    first = DenseReference.cached(path, loader, ids, batch_size=2)
    second = DenseReference.cached(path, loader, ids, batch_size=2)
    assert len(loads) == 1 and path.exists()
    torch.testing.assert_close(second.expected, first.expected, rtol=0, atol=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    assert second.kl(model) == pytest.approx(first.kl(model)) and first.kl(model) > 0
