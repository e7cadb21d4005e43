"""Saving and loading AST models.

An exported folder is a plain Hugging Face checkpoint whose projection weights carry the masks (pattern exact),
so ``AutoModelForCausalLM.from_pretrained`` loads the sparse model as is (without SLoRB). When SLoRB was trained,
``slorb.safetensors`` (one ``<layer>.weight`` S and, if trainable, ``<layer>.projection`` P per layer) and
``slorb.json`` (k, groups and shapes per layer) sit next to it; :func:`load_ast_model` rebuilds the SLoRB
branches on top of ``from_pretrained`` and gives the same outputs as the model had before saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruners.slorb import SLoRB, attach
from pruners.sparse_linear import SparseLinear, unsparsify
from prunesearch.files import read_json
from prunesearch.safety import UserError

SLORB_FORMAT = "prunesearch-slorb-v1"
SLORB_TENSORS = "slorb.safetensors"
SLORB_JSON = "slorb.json"


def finalize(model: nn.Module, layers: dict[str, SparseLinear]) -> dict[str, SLoRB]:
    """Turn a trained student back into a plain model (masks applied) with its SLoRB branches attached by hooks."""
    slorbs = {name: layer.slorb for name, layer in layers.items() if layer.slorb is not None}
    for layer in layers.values():
        layer.slorb = None
    unsparsify(model, layers)
    for name, slorb in slorbs.items():
        attach(model.get_submodule(name), slorb)
    return slorbs


def save_ast_model(model: nn.Module, tokenizer, slorbs: dict[str, SLoRB], folder: str | Path) -> None:
    """Write ``model`` (a plain model from :func:`finalize`) with ``save_pretrained`` plus the SLoRB files."""
    folder = Path(folder)
    state = {k: v for k, v in model.state_dict().items() if ".slorb." not in k}
    model.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if not slorbs:
        return
    tensors, layers = {}, {}
    for name, slorb in slorbs.items():
        tensors[f"{name}.weight"] = slorb.weight.detach().cpu().contiguous()
        if slorb.projection is not None:
            tensors[f"{name}.projection"] = slorb.projection.detach().cpu().contiguous()
        layers[name] = {"rows": slorb.weight.shape[0], "cols": slorb.cols, "groups": slorb.groups}
    first = next(iter(slorbs.values()))
    save_file(tensors, str(folder / SLORB_TENSORS))
    meta = {"format": SLORB_FORMAT, "k": first.k, "trainable_projection": first.projection is not None,
            "parameters": sum(s.num_parameters() for s in slorbs.values()), "layers": layers}
    (folder / SLORB_JSON).write_text(json.dumps(meta, indent=2))


def load_ast_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load an exported AST folder as (model, tokenizer): ``from_pretrained`` plus the SLoRB branches if any."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a saved model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    meta_path = path / SLORB_JSON
    if meta_path.is_file():
        meta = read_json(meta_path, "SLoRB description")
        if meta.get("format") != SLORB_FORMAT:
            raise UserError(f"{meta_path} is not a {SLORB_FORMAT} description")
        tensors = load_file(str(path / SLORB_TENSORS))
        for name, info in meta["layers"].items():
            slorb = SLoRB(info["rows"], info["cols"], meta["k"], meta["trainable_projection"])
            slorb.weight.data.copy_(tensors[f"{name}.weight"])
            if slorb.projection is not None:
                slorb.projection.data.copy_(tensors[f"{name}.projection"])
            attach(model.get_submodule(name), slorb.to(next(model.parameters()).dtype))
    return model.to(device).eval(), tokenizer
