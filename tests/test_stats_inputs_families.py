"""--stats-inputs pruned on every family: the uniform candidate equals the sequential one-shot model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, saved_tiny_model, search_settings
from pruners.masks import Target
from pruners.oneshot import make_pruner, prune_model
from search.engine import Workspace


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_uniform_candidate_from_pruned_inputs_is_the_pruned_model(family, pruner, tmp_path, tiny_tokenizer,
                                                                   tiny_calib_file, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "c"))
    d = saved_tiny_model(tmp_path / family, tiny_tokenizer, family)
    kw = {"level_step": 0.1} if pruner == "sparsegpt" else {}
    ws = Workspace(search_settings(d, tiny_calib_file, pruner=pruner, stats_inputs="pruned", budget="sparsity=0.5",
                                   **kw), tmp_path / "w")
    n = ws.space.dim
    ws.realize(np.full(n, 0.5))
    got = {k: m.weight.detach().clone() for k, m in ws.realizer.modules.items()}
    ws.reset()
    prune_model(ws.model, make_pruner(pruner), {k: Target(v) for k, v in ws.space.to_targets(np.full(n, 0.5)).items()},
                ws.calibration_ids())
    for k, m in ws.realizer.modules.items():
        torch.testing.assert_close(got[k], m.weight.detach(), rtol=0, atol=0)
