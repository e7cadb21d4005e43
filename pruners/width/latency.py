"""A per-layer latency table: the prefill latency of any width allocation predicted from a few timings measured once.

Measured on the current device for batch 1 and ``tokens`` tokens: the dense model's forward, one dense block, and
block 0 sliced to a grid of key/value group counts (MLP at full width) and of MLP channel counts (attention at full
width). A block's latency is taken as additive in its attention and MLP parts, interpolated linearly between grid
points, so an allocation's prediction is

    dense forward + sum over blocks of (attention(g) - block) + (mlp(c) - block),

and candidates are never timed one by one. ``benchmarks/width.py`` compares predictions with measured forwards.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruners.walker import capture_inputs, run_block
from pruners.width.geometry import BlockWidth, Geometry

GRID = 9  # grid points per kind (all group counts when there are at most this many)


@dataclass(frozen=True)
class LatencyTable:
    """Timings in milliseconds and what they were measured under."""

    tokens: int
    device: str
    threads: int
    dense_ms: float  # the whole dense model
    block_ms: float  # one dense block
    groups: tuple[int, ...]  # key/value groups kept by block 0 (MLP at full width) ...
    attention_ms: tuple[float, ...]  # ... and its latency
    channels: tuple[int, ...]  # MLP channels kept by block 0 (attention at full width) ...
    mlp_ms: tuple[float, ...]  # ... and its latency

    def attention(self, groups: float) -> float:
        """Latency of a block keeping ``groups`` key/value groups and every MLP channel."""
        return float(np.interp(groups, self.groups, self.attention_ms))

    def mlp(self, channels: float) -> float:
        """Latency of a block keeping ``channels`` MLP channels and every head."""
        return float(np.interp(channels, self.channels, self.mlp_ms))

    def predict(self, widths: list[BlockWidth]) -> float:
        """Predicted prefill latency (ms) of the model at ``widths``."""
        return self.dense_ms + sum(self.attention(w.kv_heads) + self.mlp(w.intermediate) - 2 * self.block_ms
                                   for w in widths)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        """Read a table ``save`` wrote (a missing or malformed file is one clear error)."""
        from prunesearch.files import read_json
        from prunesearch.safety import UserError

        raw = read_json(Path(path), "latency table")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except TypeError as e:
            raise UserError(f"{path} is not a latency table ({e})") from None


def _grid(n: int) -> list[int]:
    return list(range(1, n + 1)) if n <= GRID else sorted({int(round(v)) for v in np.linspace(1, n, GRID)})


def _interleaved_ms(runs: dict, reps: int) -> dict:
    """Median milliseconds of each callable, repetitions interleaved so that load drifting over the measurement
    shifts every entry alike (one warm-up call each first)."""
    for run in runs.values():
        run()
    times: dict = {k: [] for k in runs}
    for _ in range(reps):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _one_block(geom: Geometry, block: nn.Module) -> Geometry:
    """A geometry whose only block is ``block`` (a copy of block 0), so slicing it leaves the model alone."""
    class _Blocks:
        blocks = [block]

    return dataclasses.replace(geom, layout=_Blocks(), widths=[geom.widths[0]])


@torch.no_grad()
def measure(model: nn.Module, geom: Geometry, tokens: int, reps: int = 5, seed: int = 0) -> LatencyTable:
    """Time the dense model, a dense block and block 0 sliced over the grid, on the model's device."""
    from pruners.width.slicing import slice_block

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    batches = capture_inputs(model, ids, 1, device, geom.layout)
    full = geom.widths[0]
    groups, channels = _grid(full.kv_heads), _grid(full.intermediate)

    def sliced(kv: int, mlp: int):
        g = _one_block(geom, copy.deepcopy(geom.block(0)))
        slice_block(g, 0, list(range(kv)), list(range(mlp)))
        return lambda: run_block(g.block(0), batches)

    runs = {"dense": lambda: model(input_ids=ids.to(device), use_cache=False),
            "block": lambda: run_block(geom.block(0), batches)}
    runs |= {("attn", k): sliced(k, full.intermediate) for k in groups if k != full.kv_heads}
    runs |= {("mlp", c): sliced(full.kv_heads, c) for c in channels if c != full.intermediate}
    ms = _interleaved_ms(runs, reps)
    attention = [ms.get(("attn", k), ms["block"]) for k in groups]
    mlp = [ms.get(("mlp", c), ms["block"]) for c in channels]
    return LatencyTable(tokens, str(device), torch.get_num_threads(), ms["dense"], ms["block"], tuple(groups),
                        tuple(attention), tuple(channels), tuple(mlp))
