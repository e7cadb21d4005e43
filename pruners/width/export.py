"""Width-pruned models that save and load back: per-family config and model classes recording every layer's width.

A sliced model becomes an instance of ``Prunesearch<Base>ForCausalLM`` with a ``prunesearch_<base>`` config holding
``layer_heads``, ``layer_kv_heads`` and ``layer_intermediate``; ``save_pretrained`` then writes safetensors and a
config from which ``AutoModelForCausalLM.from_pretrained`` (after ``import prunesearch``) rebuilds the same shapes.
"""

from __future__ import annotations

from torch import nn

from prunesearch.autoclasses import PREFIX, config_class
from pruners.width.geometry import BlockWidth, Geometry, geometry
from pruners.width.slicing import slice_block

_model_classes: dict[str, type] = {}


def _apply_layer_widths(model: nn.Module) -> None:
    """Slice a freshly built model to the widths its config records (its weights are loaded afterwards)."""
    config = model.config
    geom = geometry(model)
    recorded = zip(config.layer_heads, config.layer_kv_heads, config.layer_intermediate)
    for i, (heads, kv, inter) in enumerate(recorded):
        if BlockWidth(heads, kv, inter) != geom.widths[i]:
            slice_block(geom, i, list(range(kv)), list(range(inter)))


def model_class(base_type: str) -> type:
    """The causal-LM class of width exports of ``base_type``: the base class, sliced to the config's widths."""
    if base_type not in _model_classes:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cfg = config_class(base_type)
        base = MODEL_FOR_CAUSAL_LM_MAPPING[cfg.__mro__[1]]

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            _apply_layer_widths(self)

        _model_classes[base_type] = type(f"Prunesearch{base.__name__}", (base,),
                                         {"config_class": cfg, "__init__": __init__, "__module__": __name__})
    return _model_classes[base_type]


def check_exportable(model: nn.Module) -> None:
    """Raise before any slicing if ``model``'s family has no width-export classes."""
    config_class(model.config.model_type.removeprefix(PREFIX))


def as_export(model: nn.Module, geom: Geometry) -> nn.Module:
    """Turn a sliced model, in place, into its family's width-export class with the per-layer widths in its config
    (the config object is kept, as every module holds it; only its class and the width lists change)."""
    base_type = model.config.model_type.removeprefix(PREFIX)
    config = model.config
    config.__class__ = config_class(base_type)
    config.layer_heads = [w.heads for w in geom.widths]
    config.layer_kv_heads = [w.kv_heads for w in geom.widths]
    config.layer_intermediate = [w.intermediate for w in geom.widths]
    model.__class__ = model_class(base_type)
    return model
