"""Per-layer widths: uniform, from a config's ``width`` section, or by FLAP-style global ranking of unit scores."""

from __future__ import annotations

import math

import torch

from pruners.width.counting import Shapes
from pruners.width.geometry import BlockWidth, Geometry
from pruners.width.importance import Importance
from prunesearch.safety import UserError


def _kept(n: int, share: float) -> int:
    return min(n, max(1, math.floor(share * n + 0.5)))


def uniform(geom: Geometry, share: float) -> list[BlockWidth]:
    """Every block keeps ``share`` of its key/value groups and MLP channels (rounded, at least one of each)."""
    if not 0 < share <= 1:
        raise UserError(f"--width is the share of heads and channels kept, in (0, 1]; got {share}")
    out = []
    for w in geom.widths:
        kv = _kept(w.kv_heads, share)
        out.append(BlockWidth(kv * geom.group, kv, _kept(w.intermediate, share)))
    return out


def from_config(geom: Geometry, section: dict) -> list[BlockWidth]:
    """Widths from a config's ``width`` section: ``{"0": {"heads": 8, "intermediate": 1024}, ...}``; blocks not
    listed, and keys not given, keep their current width. ``heads`` counts query heads, in whole key/value groups."""
    out = list(geom.widths)
    for key, spec in section.items():
        if not str(key).isdigit() or int(key) >= len(out):
            raise UserError(f"width config: {key!r} is not a block index below {len(out)}")
        if not isinstance(spec, dict) or set(spec) - {"heads", "intermediate"}:
            raise UserError(f"width config: block {key} must be an object with heads and/or intermediate")
        i, w = int(key), out[int(key)]
        heads, inter = spec.get("heads", w.heads), spec.get("intermediate", w.intermediate)
        if not isinstance(heads, int) or not 0 < heads <= w.heads or heads % geom.group:
            raise UserError(f"width config: block {i} heads must be a multiple of {geom.group} (query heads per "
                            f"key/value head) in [{geom.group}, {w.heads}], got {heads!r}")
        if not isinstance(inter, int) or not 0 < inter <= w.intermediate:
            raise UserError(f"width config: block {i} intermediate must be in [1, {w.intermediate}], got {inter!r}")
        out[i] = BlockWidth(heads, heads // geom.group, inter)
    return out


def _standardized(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat(scores).double()
    mean, std = flat.mean(), flat.std().clamp_min(1e-12)
    return [(s.double() - mean) / std for s in scores]


def global_ranking(geom: Geometry, imp: Importance, s: Shapes, removed_share: float) -> list[BlockWidth]:
    """FLAP-style allocation: standardize group and channel scores across all blocks (each kind on its own), then
    remove the lowest-scoring units model-wide until ``removed_share`` of the blocks' parameters is gone (every block
    keeps at least one group and one channel)."""
    if not 0 <= removed_share < 1:
        raise UserError(f"share of block parameters to remove must be in [0, 1), got {removed_share}")
    units = [(score.item(), i, "group") for i, ss in enumerate(_standardized(imp.groups)) for score in ss]
    units += [(score.item(), i, "channel") for i, ss in enumerate(_standardized(imp.channels)) for score in ss]
    units.sort(key=lambda u: u[0])
    groups = [w.kv_heads for w in geom.widths]
    channels = [w.intermediate for w in geom.widths]
    goal = removed_share * sum(s.block_params(w) for w in geom.widths)
    cost = {"group": s.group_params(), "channel": s.channel_params()}
    removed = 0
    for _, i, kind in units:
        if removed >= goal:
            break
        left = groups if kind == "group" else channels
        if left[i] > 1:
            left[i] -= 1
            removed += cost[kind]
    return [BlockWidth(g * geom.group, g, c) for g, c in zip(groups, channels)]


def uniform_params(geom: Geometry, s: Shapes, removed_share: float) -> list[BlockWidth]:
    """Every block the same width with ``removed_share`` of its parameters removed: heads and channels kept at the
    share 1 - removed_share, key/value groups rounded, and the channels then set so the block hits the target
    (rounded up: at most one channel's parameters short of it)."""
    if not 0 <= removed_share < 1:
        raise UserError(f"share of block parameters to remove must be in [0, 1), got {removed_share}")
    out = []
    for w in geom.widths:
        kv = _kept(w.kv_heads, 1 - removed_share)
        attention = BlockWidth(kv * geom.group, kv, 0)
        goal = (1 - removed_share) * s.block_params(w) - s.block_params(attention)
        channels = math.ceil(goal / s.channel_params()) if goal > 0 else 1
        out.append(BlockWidth(attention.heads, kv, min(w.intermediate, max(1, channels))))
    return out
