"""Parameters, FLOPs per token and memory of a width allocation, counted analytically from the model's shapes.

FLOPs: 2 per multiply-accumulate of every matrix product of a forward pass over ``seqlen`` tokens (batch 1),
divided by ``seqlen``: the q/k/v/output and MLP projections, the attention scores QKᵀ and their product with V
over the full ``seqlen`` x ``seqlen`` matrix (4 · seqlen · heads · head_dim per token and block), and the LM head.
Biases, norms, activations, softmax, rotary embeddings and the embedding lookup are not counted.
Memory: weight bytes plus the KV cache (keys and values of every block) at a stated context, batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pruners.width.geometry import BlockWidth, Geometry, sub


@dataclass(frozen=True)
class Shapes:
    """What the counts need: sizes, which projections have biases, and the parameters outside the blocks' units."""

    hidden: int
    head_dim: int
    group: int
    gated: bool
    qkv_bias: bool
    out_bias: bool
    up_bias: bool
    down_bias: bool
    lm_head: int
    other_params: int
    bytes_per_param: int

    def attention_params(self, w: BlockWidth) -> int:
        """Weights and biases of q/k/v and the output projection at ``w``'s heads."""
        qkv = (w.heads + 2 * w.kv_heads) * self.head_dim
        return qkv * (self.hidden + self.qkv_bias) + w.heads * self.head_dim * self.hidden + self.out_bias * self.hidden

    def mlp_params(self, w: BlockWidth) -> int:
        """Weights and biases of the MLP at ``w``'s channels."""
        inputs = 2 if self.gated else 1
        return inputs * w.intermediate * (self.hidden + self.up_bias) + w.intermediate * self.hidden \
            + self.down_bias * self.hidden

    def block_params(self, w: BlockWidth) -> int:
        return self.attention_params(w) + self.mlp_params(w)

    def group_params(self) -> int:
        """Parameters one key/value group (with its query heads) costs."""
        return self.attention_params(BlockWidth(self.group, 1, 0)) - self.attention_params(BlockWidth(0, 0, 0))

    def channel_params(self) -> int:
        """Parameters one MLP channel costs."""
        return self.mlp_params(BlockWidth(0, 0, 1)) - self.mlp_params(BlockWidth(0, 0, 0))


def shapes(model: nn.Module, geom: Geometry) -> Shapes:
    """Read the counting shapes of ``model`` (whose current widths are ``geom.widths``)."""
    block = geom.block(0)

    def has_bias(path: str | None) -> bool:
        return path is not None and sub(block, path).bias is not None

    base = Shapes(geom.hidden, geom.head_dim, geom.group, geom.gated, has_bias(geom.heads.qkv[0]),
                  has_bias(geom.heads.out), has_bias(geom.ffn.up), has_bias(geom.ffn.down),
                  model.get_output_embeddings().weight.numel(), 0, next(model.parameters()).element_size())
    inside = sum(base.block_params(w) for w in geom.widths)
    total = sum(p.numel() for p in model.parameters())
    return Shapes(**{**base.__dict__, "other_params": total - inside})


def params(s: Shapes, widths: list[BlockWidth]) -> int:
    """All parameters of the model at ``widths`` (a tied LM head counted once, as ``model.parameters()`` does)."""
    return s.other_params + sum(s.block_params(w) for w in widths)


def flops_per_token(s: Shapes, widths: list[BlockWidth], seqlen: int) -> int:
    """Forward FLOPs per token over a ``seqlen``-token sequence (definition in the module docstring)."""
    total = 2 * s.lm_head
    for w in widths:
        qkv = (w.heads + 2 * w.kv_heads) * s.head_dim * s.hidden
        out = w.heads * s.head_dim * s.hidden
        mlp = (3 if s.gated else 2) * w.intermediate * s.hidden
        total += 2 * (qkv + out + mlp) + 4 * seqlen * w.heads * s.head_dim
    return total


def memory_bytes(s: Shapes, widths: list[BlockWidth], context: int, batch: int = 1) -> dict[str, int]:
    """Weight bytes and KV-cache bytes at ``context`` tokens for ``batch`` sequences, in the model's dtype."""
    weights = params(s, widths) * s.bytes_per_param
    kv = sum(2 * w.kv_heads * s.head_dim for w in widths) * context * batch * s.bytes_per_param
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
