"""On the trained built-in model the methods separate as the literature says: SparseGPT beats Wanda and magnitude.

Measured as KL to the dense model on held-out C4 (the calibration distribution, 32 x 256 tokens): a margin of about
2x there, where perplexity on a 64-window WikiText-2 slice differs by a few points and flips between builds of the
model (training is not bit-reproducible across machines). Models this small lack the outlier activations that make
Wanda beat magnitude at scale, so that order is not asserted (the benchmark reports it).
"""

from __future__ import annotations

import pytest

from prunesearch import data
from prunesearch.default_model import DEFAULT_SEQLEN
from prunesearch.evaluate import DenseReference
from prunesearch.models import load_model
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import layout
from pruners.targets import SparsityConfig


@pytest.fixture(scope="module")
def setup():
    model, tok, _ = load_model(None, "cpu", "float32")
    calib = data.calibration_ids(tok, "c4", 64, DEFAULT_SEQLEN, 0)
    reference = DenseReference.compute(model, data.heldout_ids(tok, 32, DEFAULT_SEQLEN, 0))
    return model, calib, reference, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("sparsity,pattern", [(0.7, "unstructured"), (None, "2:4")])
def test_sparsegpt_beats_wanda_and_magnitude(setup, sparsity, pattern):
    model, calib, reference, dense = setup
    kl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense)
        targets = SparsityConfig.uniform(sparsity, pattern).resolve(layout(model))
        prune_model(model, make_pruner(method), targets, calib if method != "magnitude" else None)
        kl[method] = reference.kl(model)
    model.load_state_dict(dense)
    assert kl["sparsegpt"] < 0.8 * kl["wanda"], kl
    assert kl["sparsegpt"] < 0.8 * kl["magnitude"], kl
