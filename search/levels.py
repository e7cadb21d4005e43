"""A SparseGPT level database: every projection pruned at every level once, a candidate swaps weights in.

SparseGPT updates the kept weights, so unlike a score-based pruner its result at one sparsity is not a threshold
of a fixed ranking. As in EvoPress, each projection is pruned at each level of its unit's grid from the *dense*
model's calibration inputs (one walk, no propagation of pruning) — or, with ``prefix``, from inputs propagated
through blocks already pruned at the budget, as the sequential SparseGPT that realizes the result sees them (on
SmolLM2 at 70% the dense-input database reads every allocation far worse than it realizes). The results are
stored on disk one safetensors file per block, and a candidate is realized by copying the stored weights in. The
walk also records OWL's per-block outlier ratios (from the dense model: a second walk when ``prefix`` is set).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pruners.masks import Target
from pruners.registry import ModelLayout, get_weight, set_weight
from pruners.sparsegpt import prepare, sparsegpt
from pruners.walker import collect_stats, run_block
from pruners.wanda import Wanda
from search.scores import outlier_ratio, prefix_walk

log = logging.getLogger("prunesearch.search")


def _key(name: str, level: float) -> str:
    return f"{name}@{level:.8f}"


def _level_of(levels: dict[str, list[float]], name: str, level: float) -> float:
    """The stored level of projection ``name`` equal to ``level`` up to float noise."""
    near = min(levels[name], key=lambda v: abs(v - level))
    if abs(near - level) > 1e-6:
        raise KeyError(f"{name} has no stored level {level:.6f}; its levels are {levels[name]}")
    return near


class LevelDatabase:
    """Pruned weights of every projection at each of its levels, read lazily from per-block files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "levels.json").read_text())
        self.levels: dict[str, list[float]] = meta["levels"]
        self.m: int = meta["m"]
        self.outlier_ratio: list[float] = meta["outlier_ratio"]
        self.damping: dict[str, float] = meta["damping"]
        self._files = [safe_open(str(self.folder / f), "pt") for f in meta["files"]]
        self._file_of = {name: i for i, f in enumerate(meta["files"]) for name in meta["members"][f]}

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, lay: ModelLayout, levels: dict[str, list[float]], m: int,
              calib_ids: torch.Tensor, folder: Path, device: str = "cpu", batch_size: int = 8,
              blocksize: int = 128, percdamp: float = 0.01, prefix: float | None = None) -> LevelDatabase:
        """Walk the model once; prune each projection at each of its (non-zero) ``levels`` with SparseGPT. With
        ``prefix`` (one of every projection's levels) each block is left at that level while its outputs feed the
        next block (the model's weights are dense again afterwards)."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        wanda = Wanda()
        outliers: list[float] = []
        damping: dict[str, float] = {}
        files: list[str] = []
        members: dict[str, list[str]] = {}
        dense: dict[str, torch.Tensor] = {}

        def visit(i: int, block: nn.Module, batches) -> None:
            with collect_stats(lay.projections[i], full=True) as stats:
                run_block(block, batches)
            tensors, metrics = {}, []
            for name, module in lay.projections[i].items():
                w = get_weight(module).float()
                metrics.append(wanda.score(w, stats[name]))
                hessian = stats[name].hessian
                prepared = prepare(hessian, percdamp)
                damping[name] = prepared[1]
                for level in levels[name]:
                    if level > 0:
                        pruned = sparsegpt(w, hessian, Target(level, m), blocksize, percdamp, prepared=prepared)[0]
                        tensors[_key(name, level)] = pruned.to(module.weight.dtype).cpu().contiguous()
                if prefix:
                    dense[name] = get_weight(module).clone()
                    set_weight(module, tensors[_key(name, _level_of(levels, name, prefix))])
            outliers.append(outlier_ratio(metrics))
            file = f"block-{i:04d}.safetensors"
            save_file(tensors, str(tmp / file))
            files.append(file)
            members[file] = list(lay.projections[i])

        outliers = prefix_walk(model, lay, calib_ids, visit, dense, device, batch_size) or outliers
        meta = {"levels": levels, "m": m, "outlier_ratio": outliers, "damping": damping, "files": files,
                "members": members}
        (tmp / "levels.json").write_text(json.dumps(meta))
        tmp.rename(folder)
        return cls(folder)

    def move(self, dest: Path) -> None:
        """Move the database folder to ``dest`` (open files stay valid); a build folder left empty is removed."""
        import os
        import shutil

        old = self.folder
        os.replace(old, dest)
        self.folder = Path(dest)
        if old.parent.name.startswith(".levels-building-"):
            shutil.rmtree(old.parent, ignore_errors=True)

    def weight(self, name: str, level: float) -> torch.Tensor:
        """The stored SparseGPT result of projection ``name`` at ``level`` (which must be one of its levels)."""
        return self._files[self._file_of[name]].get_tensor(_key(name, _level_of(self.levels, name, level)))


class LevelRealizer:
    """Writes allocations into a model by swapping in stored weights; keeps one copy of the dense weights."""

    def __init__(self, lay: ModelLayout, db: LevelDatabase):
        self.db = db
        self.modules = {n: lay.projections[lay.block_of(n)][n] for n in lay.projection_names()}
        self.dense = {n: get_weight(m).clone() for n, m in self.modules.items()}

    def apply(self, targets: dict[str, float]) -> None:
        """Set every projection to its stored weight at its target level (dense at 0)."""
        for name, module in self.modules.items():
            s = targets.get(name, 0.0)
            set_weight(module, self.db.weight(name, s) if s > 0 else self.dense[name])
