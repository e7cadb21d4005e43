"""Widths-and-sparsity candidates realized in place by masking (``--space both``): every projection restored to its
dense weight, then zeroed where its block's removed key/value groups and MLP channels lie (their rows of q/k/v and
up/gate, their columns of the attention output and down projections: exactly the weights slicing removes), and
where Wanda, run on the sliced model, would prune the kept weights: per output row, the lowest-ranked kept weights
under the cached ranks of the dense model (``search.scores.ScoreCache``), as many as ``pruners.masks.pruned_count``
gives for the row's kept length. Slicing preserves the order of the kept columns, so these are the ranks within
the kept weights."""

from __future__ import annotations

import torch

from pruners.masks import pruned_count
from pruners.registry import get_weight, set_weight
from pruners.width.geometry import BlockWidth, Geometry, sub
from pruners.width.importance import Importance
from search.scores import ScoreCache


class BothRealizer:
    """Writes width-and-sparsity allocations into a model in place, keeping one copy of the dense projections."""

    def __init__(self, geom: Geometry, imp: Importance, cache: ScoreCache):
        if not cache.per_row or cache.m:
            raise ValueError("--space both needs per-row unstructured ranks (Wanda)")
        self.geom, self.imp, self.cache = geom, imp, cache
        lay = geom.layout
        self.names = [{id(m): n for n, m in lay.projections[i].items()} for i in range(len(geom.widths))]
        self.modules = {n: m for block in lay.projections for n, m in block.items()}
        self.dense = {n: get_weight(m).clone() for n, m in self.modules.items()}
        device = next(iter(self.dense.values())).device
        cache.ranks = {n: r.to(device) for n, r in cache.ranks.items()}
        self.ranks = cache.ranks

    def _name(self, i: int, path: str) -> str:
        return self.names[i][id(sub(self.geom.block(i), path))]

    def masks(self, i: int, width: BlockWidth, sparsity: float) -> dict[str, torch.Tensor]:
        """Block ``i``'s pruned weights (True) per projection at ``width`` and ``sparsity`` of the kept ones."""
        geom = self.geom
        groups, channels = self.imp.keep(i, width.kv_heads, width.intermediate)
        rows = {p: r for p, r in zip(geom.heads.qkv, geom.qkv_rows(i, groups))}
        rows |= {p: channels for p in (geom.ffn.up, geom.ffn.gate) if p}
        out = {}
        for path, kept in rows.items():  # kept rows keep their dense per-row mask; the others go
            name = self._name(i, path)
            mask = self.cache.mask(name, sparsity) if sparsity > 0 else torch.zeros_like(self.ranks[name], dtype=bool)
            gone = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
            gone[kept] = False
            out[name] = mask | gone[:, None]
        for path, kept in ((geom.heads.out, geom.out_columns(groups)), (geom.ffn.down, channels)):
            name = self._name(i, path)
            ranks = self.ranks[name]
            mask = torch.ones_like(ranks, dtype=torch.bool)
            cols = torch.tensor(kept, dtype=torch.long, device=ranks.device)
            k = pruned_count(len(kept), sparsity)
            sub_mask = torch.zeros(ranks.shape[0], len(kept), dtype=torch.bool, device=ranks.device)
            if k > 0:
                kept_ranks = ranks.index_select(1, cols).float()  # exact: ranks stay below 2^24
                sub_mask = kept_ranks <= kept_ranks.kthvalue(k, dim=1, keepdim=True).values
            mask[:, cols] = sub_mask
            out[name] = mask
        return out

    @torch.no_grad()
    def apply(self, widths: list[BlockWidth] | None = None, sparsities: list[float] | None = None) -> None:
        """Restore the dense weights, then mask every block to its width and sparsity (None: stay dense)."""
        for name, module in self.modules.items():
            set_weight(module, self.dense[name])
        if widths is None:
            return
        for i, (width, s) in enumerate(zip(widths, sparsities)):
            if width == self.geom.widths[i] and s <= 0:
                continue
            for name, mask in self.masks(i, width, s).items():
                set_weight(self.modules[name], self.dense[name].masked_fill(mask, 0))
