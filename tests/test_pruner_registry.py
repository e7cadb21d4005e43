"""The pruner registry (pruners.methods) is what the CLI offers and what each method really does."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import tiny_model
from pruners.masks import Target
from pruners.methods import METHODS, modifiers, names
from pruners.oneshot import make_pruner, prune_model
from pruners.registry import get_weight, layout
from prunesearch.cli import build_parser
from prunesearch.commands.common import UsageError, check_wbits
from prunesearch.safety import UserError
from search.settings import SearchSettings


def _choices(command: str, flag: str) -> list[str]:
    """The choices argparse accepts for ``prunesearch COMMAND FLAG``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(next(a.choices for a in sub.choices[command]._actions if flag in a.option_strings))


def test_the_cli_offers_exactly_the_registry():
    assert _choices("prune", "--method") == [*METHODS, "width"]
    assert _choices("realize", "--method") == [*METHODS, "width"]
    assert _choices("search", "--pruner") == names(searchable=True)
    assert _choices("export", "--modifier") == list(modifiers()) == ["wanda", "sparsegpt"]


def test_sparsellm_cannot_be_searched_and_only_sparsegpt_quantizes():
    assert "sparsellm" in METHODS and "sparsellm" not in names(searchable=True)
    with pytest.raises(UserError, match="sparsellm cannot be searched"):
        SearchSettings(pruner="sparsellm").validate()
    assert names(realizer="levels") == ["sparsegpt"]
    for name, method in METHODS.items():
        if method.quantizes:
            check_wbits(name, 4)
            assert make_pruner(name, wbits=4).wbits == 4
        else:
            with pytest.raises(UsageError, match="only works with --method sparsegpt"):
                check_wbits(name, 4)


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_needs_selection_and_weight_update_hold(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))  # GBLM's gradient cache
    method = METHODS[name]
    assert make_pruner(name).name == name
    model = tiny_model("llama")
    lay = layout(model)
    dense = {n: get_weight(lay.projections[lay.block_of(n)][n]).clone() for n in lay.projection_names()}
    targets = {n: Target(0.5) for n in dense}
    if method.needs == "none":
        prune_model(model, make_pruner(name), targets, calib_ids=None)
    else:
        with pytest.raises(ValueError, match="needs calibration data"):
            prune_model(model, make_pruner(name), targets, calib_ids=None)
        assert hasattr(method.cls, "extra_stats") == (method.needs == "gradients")
        prune_model(model, make_pruner(name), targets, torch.randint(0, 320, (4, 32)))
    for n, w0 in dense.items():
        w = get_weight(lay.projections[lay.block_of(n)][n])
        kept = w != 0
        assert (~kept).float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert torch.equal(w[kept], w0[kept]) != method.updates_weights
        per_row = (~kept).sum(1)
        if method.selection == "row":
            assert (per_row == per_row[0]).all()
        elif method.selection == "layer":
            assert not (per_row == per_row[0]).all()
