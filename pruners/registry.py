"""Where the decoder blocks and prunable projections of each model family are.

Known families are listed explicitly; any other causal LM made of a ``ModuleList`` of decoder blocks is walked
through the generic fallback, which treats every linear layer inside a block as prunable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunesearch.autoclasses import PREFIX as EXPORT_PREFIX
from prunesearch.safety import UserError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    from transformers.modeling_utils import Conv1D


@dataclass(frozen=True)
class FFN:
    """How a block's feed-forward network computes: ``down(act(gate(x)) * up(x))`` if gated, else ``down(act(up(x)))``.

    Names are local to the block; the activation is named by the first of ``act_keys`` the model config sets.
    """

    up: str
    down: str
    gate: str | None = None
    act_keys: tuple[str, ...] = ("hidden_act",)


@dataclass(frozen=True)
class Heads:
    """How a block's attention splits into heads, for width pruning; names are local to the block.

    ``qkv`` lists the projections whose output rows are per head: ``(q, k, v)``, or one fused projection whose rows
    are the q, k and v blocks one after the other (GPT-2's ``c_attn``). ``out`` reads the heads as input columns.
    ``count_attrs`` are attributes of the attention module that hold its query-head count and ``width_attrs`` its
    query width (heads x head_dim); width pruning sets them per layer because the module reads them in ``forward``.
    """

    module: str
    qkv: tuple[str, ...]
    out: str
    count_attrs: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return len(self.qkv) == 1


@dataclass(frozen=True)
class Family:
    """Layout of one model family: the dotted path to its block list, the projections of one block, its FFN and,
    when width pruning knows it, how its attention splits into heads. ``bias_flags`` are config flags that, all set,
    give every attention and MLP projection a bias (LLaMA's ``attention_bias``, ``mlp_bias``; a member whose config
    lacks them, such as Qwen2, cannot add biases)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    ffn: FFN | None = None
    heads: Heads | None = None
    bias_flags: tuple[str, ...] = ()


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                     "granite", "smollm3"), "model.layers", _LLAMA_ATTN, _GATED_MLP,
           FFN("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj", ("hidden_activation", "hidden_act")),
           Heads("self_attn", _LLAMA_ATTN[:3], "self_attn.o_proj"), ("attention_bias", "mlp_bias")),
    Family("opt", ("opt",), "model.decoder.layers",
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2"),
           FFN("fc1", "fc2", act_keys=("activation_function",)),
           Heads("self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj",
                 count_attrs=("num_heads",))),
    Family("gpt2", ("gpt2",), "transformer.h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
           FFN("mlp.c_fc", "mlp.c_proj", act_keys=("activation_function",)),
           Heads("attn", ("attn.c_attn",), "attn.c_proj", count_attrs=("num_heads",), width_attrs=("split_size",))),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("attention.query_key_value", "attention.dense"),
           ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), FFN("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
)

_GENERIC_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                        "transformer.blocks", "transformer.layers", "model.transformer.h")
_ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")


def is_prunable(module: nn.Module) -> bool:
    """Linear layers (``nn.Linear`` and GPT-2's transposed ``Conv1D``) are what one-shot pruners prune."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``module`` (its weight, its gradient) in ``nn.Linear`` layout (out x in)."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout (out x in); GPT-2's ``Conv1D`` stores its transpose."""
    return linear_layout(module, module.weight.data)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write back a weight given in ``nn.Linear`` layout, keeping the module's dtype and device."""
    w = weight.t() if isinstance(module, Conv1D) else weight
    module.weight.data.copy_(w.to(module.weight.dtype))


def _get(root: nn.Module, path: str) -> nn.Module | None:
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


@dataclass
class ModelLayout:
    """The blocks of one model instance and, per block, its prunable projections by full module name."""

    family: str
    blocks_path: str
    blocks: nn.ModuleList
    projections: list[dict[str, nn.Module]]
    ffn: FFN | None = None
    activation: str | None = None
    heads: Heads | None = None
    bias_flags: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def projection_names(self) -> list[str]:
        """All prunable projections, in block order then module order."""
        return [name for block in self.projections for name in block]

    def block_of(self, name: str) -> int:
        """Index of the block holding projection ``name``."""
        for i, block in enumerate(self.projections):
            if name in block:
                return i
        raise KeyError(name)

    def local_name(self, name: str) -> str:
        """A projection's name inside its block (``self_attn.q_proj``), the same in every block."""
        return name[len(self.blocks_path) + 1:].split(".", 1)[1]

    def kind_of(self, name: str) -> str:
        """``attention`` or ``mlp``: the role of a projection inside its block."""
        local = self.local_name(name)
        family = next((f for f in FAMILIES if f.name == self.family), None)
        if family is not None:
            return "attention" if local in family.attention else "mlp"
        return "attention" if any(w in local for w in _ATTENTION_WORDS) else "mlp"

    def ffn_names(self, i: int) -> dict[str, str]:
        """Full names of block ``i``'s FFN projections by role (``up``, ``down``, and ``gate`` when gated)."""
        if self.ffn is None or self.activation is None:
            raise UserError(f"the FFN structure of {self.family!r} models is unknown; describe it with an FFN in "
                            "its Family in pruners/registry.py")
        roles = {"up": self.ffn.up, "down": self.ffn.down, "gate": self.ffn.gate}
        return {role: f"{self.blocks_path}.{i}.{local}" for role, local in roles.items() if local}

    def width_spec(self) -> tuple[Heads, FFN]:
        """How this model's attention splits into heads and its FFN into channels (what width pruning slices)."""
        if self.heads is None or self.ffn is None:
            raise UserError(f"width pruning does not know how {self.family!r} models split into heads and channels; "
                            "describe it with Heads and FFN in its Family in pruners/registry.py")
        return self.heads, self.ffn

    def numel(self, name: str) -> int:
        """Number of weights of a projection (what sparsity budgets are weighted by)."""
        return self.projections[self.block_of(name)][name].weight.numel()


def layout(model: nn.Module) -> ModelLayout:
    """Find the blocks and projections of ``model``; raises a clear error if the model cannot be walked."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base_type = model_type.removeprefix(EXPORT_PREFIX) if isinstance(model_type, str) else model_type  # width exports
    family = next((f for f in FAMILIES if base_type in f.model_types), None)
    candidates = [family.blocks] if family else list(_GENERIC_BLOCK_PATHS)
    for path in candidates:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            break
    else:
        raise UserError(
            f"cannot walk {type(model).__name__} (model_type={model_type!r}): no decoder block list found at "
            f"{', '.join(candidates)}; add a Family for it in pruners/registry.py"
        )
    projections = []
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        if family:
            names = family.attention + family.mlp
            found = {f"{prefix}.{n}": _get(block, n) for n in names}
            missing = [n for n, m in found.items() if m is None or not is_prunable(m)]
            if missing:
                raise UserError(f"{type(model).__name__}: expected projections {missing} are missing or not linear")
        else:
            found = {f"{prefix}.{n}": m for n, m in block.named_modules() if n and is_prunable(m)}
            if not found:
                raise UserError(f"cannot walk {type(model).__name__}: block {prefix} has no linear layers")
        projections.append(found)
    ffn = family.ffn if family else None
    config = getattr(model, "config", None)
    activation = next((getattr(config, k) for k in ffn.act_keys if getattr(config, k, None)), None) if ffn else None
    return ModelLayout(family.name if family else "generic", path, blocks, projections, ffn, activation,
                       family.heads if family else None, family.bias_flags if family else ())
