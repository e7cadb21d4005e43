"""--stats-inputs candidate: every candidate is the model the sequential one-shot pruner makes of it, on every
family, for Wanda and GBLM; a search runs end to end with it (misuse: ``test_bad_input.py``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES, saved_tiny_model, search_settings
from pruners.masks import Target
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import get_weight
from search.engine import Workspace


def _weights(ws) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in ws.realizer.modules.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_candidate_is_the_sequentially_pruned_model(family, tmp_path, tiny_tokenizer, tiny_calib_file,
                                                      monkeypatch):
    """A jagged allocation realized by the search equals ``prune_model`` on the first ``candidate_nsamples``
    calibration sequences bit for bit, while the cached-rank proxy differs from it in the later blocks."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "c"))
    d = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    ws = Workspace(search_settings(d, tiny_calib_file, stats_inputs="candidate", candidate_nsamples=2),
                   tmp_path / "w")
    proxy = Workspace(search_settings(d, tiny_calib_file), tmp_path / "p")
    assert not hasattr(ws.scores, "ranks")  # no ranks kept: OWL's ratios alone, the dense model's
    assert ws.scores.outlier_ratio == pytest.approx(proxy.scores.outlier_ratio, rel=1e-6)
    alloc = np.linspace(0.35, 0.85, ws.space.dim)
    ws.realize(alloc)
    searched = _weights(ws)
    proxy.realize(alloc)
    ranked = _weights(proxy)
    ws.reset()
    assert all(torch.equal(get_weight(m), proxy.realizer.dense[n]) for n, m in ws.realizer.modules.items())
    targets = {n: Target(v) for n, v in ws.space.to_targets(alloc).items()}
    prune_model(ws.model, make_pruner("wanda"), targets, ws.calibration_ids()[:2])
    sequential = _weights(ws)
    for name in sequential:
        torch.testing.assert_close(searched[name], sequential[name], rtol=0, atol=0)
    late = ws.lay.projections[-1]
    assert any(not torch.equal(ranked[n], sequential[n]) for n in late)
    # the fitness the search records is the pruned model's
    ws.reset()
    measured = ws.measure(alloc)["fitness"]
    prune_model(ws.model, make_pruner("wanda"), targets, ws.calibration_ids()[:2])
    assert measured == pytest.approx(ws.fitness.value(*ws.fitness.partial(ws.model, 0, ws.heldout.shape[0])),
                                     rel=1e-9)


def test_gblm_candidates_reuse_the_dense_gradients(tiny_llama_dir, tiny_calib_file, tmp_path, monkeypatch):
    """GBLM's gradient norms come from the dense model once; each candidate is GBLM's sequential model."""
    import pruners.oneshot as oneshot

    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file, pruner="gblm", stats_inputs="candidate"),
                   tmp_path / "w")
    assert set(ws.realizer.extra) == set(ws.realizer.dense)
    calls = []
    real = oneshot.extra_stats
    monkeypatch.setattr(oneshot, "extra_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    alloc = np.full(ws.space.dim, 0.6)
    ws.realize(alloc)
    searched = _weights(ws)
    assert calls == []
    ws.reset()
    targets = {n: Target(v) for n, v in ws.space.to_targets(alloc).items()}
    prune_model(ws.model, make_pruner("gblm"), targets, ws.calibration_ids()[:ws.settings.candidate_nsamples])
    for name, w in _weights(ws).items():
        torch.testing.assert_close(searched[name], w, rtol=0, atol=0)


@pytest.mark.parametrize("builtin, pruner, space, expected", [
    (False, "wanda", "sparsity", "candidate"), (False, "gblm", "sparsity", "candidate"),
    (True, "wanda", "sparsity", None), (False, "magnitude", "sparsity", None), (False, "sparsegpt", "sparsity", None),
    (False, "wanda", "width", None), (False, "wanda", "both", None)])
def test_real_models_prune_every_candidate_by_default(builtin, pruner, space, expected):
    """Wanda and GBLM sparsity searches of a model other than the built-in one default to candidate inputs; the
    rest keep their realizer's default (None)."""
    from search.engine import default_stats_inputs

    assert default_stats_inputs(builtin, pruner, space) == expected


def test_search_with_candidate_inputs_end_to_end(tiny_llama_dir, tiny_calib_file, tmp_path):
    """A CLI search of a user's model prunes every candidate for real by default, end to end, and records it."""
    from prunesearch.cli import main

    out = tmp_path / "run"
    rc = main(["search", "--model", str(tiny_llama_dir), "--calib", str(tiny_calib_file), "--budget", "sparsity=0.6",
               "--nsamples", "4", "--seqlen", "32", "--fitness-samples", "6", "--low-fidelity-samples", "2",
               "--trials", "8", "--candidate-nsamples", "3", "--report-ppl=", "--out", str(out)])
    assert rc == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["stats_inputs"] == "candidate" and config["candidate_nsamples"] == 3
    frame = pd.read_parquet(out / "trials.parquet")
    done = frame[frame.state == "COMPLETE"]
    assert len(done) >= 8 and np.isfinite(done.fitness).all()
    best = json.loads((out / "best_config.json").read_text())
    assert np.mean(list(best["sparsity"].values())) == pytest.approx(0.6, abs=1e-6)
