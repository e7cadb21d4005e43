"""Loading models the Hugging Face way: the built-in default, a local folder, or a hub id when online."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunesearch import gguf_source
from prunesearch.sources import hub_reachable
from prunesearch.safety import UserError, check_finite, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; an unavailable ``cuda`` is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str, config_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` → the checkpoint's half precision on GPU, float32 on CPU."""
    if dtype == "auto":
        if device.startswith("cuda") and config_dtype in (torch.bfloat16, torch.float16):
            return config_dtype
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def model_source(model: str | None) -> str:
    """Where ``--model`` points: the default model's folder (built on first use), a local folder, a GGUF file, a
    named packaged model (``smollm2-135m``), a hub id, or ``owner/repo/file.gguf`` on the hub."""
    if model is None:
        from prunesearch.default_model import ensure_default_model

        return str(ensure_default_model())
    named = gguf_source.named_model(model)
    if named is not None:
        return named
    path = Path(model).expanduser()
    if path.is_file() and gguf_source.is_gguf(model):
        return str(path.resolve())
    if gguf_source.is_gguf(model) and not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 2:
            raise UserError(f"GGUF file {model} does not exist")
        if not hub_reachable():
            raise UserError(f"GGUF model {model!r} is not a local file and the Hugging Face hub is not "
                            "reachable; give a local .gguf path")
        return model
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(("/", ".json"))
    if looks_like_path:
        raise UserError(f"model path {model} does not exist")
    if not hub_reachable():
        raise UserError(
            f"model {model!r} is not a local folder and the Hugging Face hub is not reachable; give a local path"
        )
    return model


def load_model(model: str | None, device: str = "cpu", dtype: str = "auto", compute_device: str | None = None):
    """Load (model, tokenizer, source) in eval mode on ``device``.

    ``dtype="auto"`` is resolved for ``compute_device`` (default ``device``): pruning keeps the model on CPU
    while blocks visit the GPU, and should still run in the checkpoint's half precision there.
    """

    source = model_source(model)
    folder = weights_folder(source)
    config = load_config(source)
    config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = DTYPES.get(config_dtype)
    torch_dtype = resolve_dtype(dtype, compute_device or device, config_dtype)
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"model {source}: its weights cannot be loaded ({first_line(e)})") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"model {source}: its tokenizer cannot be loaded ({first_line(e)})") from e
    check_finite(net, f"model {source}")  # NaN or inf weights would prune, evaluate and search to NaN
    return net.to(device).eval(), tokenizer, source


def weights_folder(source: str) -> str:
    """The Hugging Face folder (or hub id) that holds a source's weights: a GGUF file's dequantized copy."""
    return str(gguf_source.float_copy(source)) if gguf_source.is_gguf(source) else source


def describe_model(source: str) -> dict:
    """The protocol record of a model source: where it came from and, for a GGUF file, its sha256 and
    quantization type (its weights passed through that quantization before being dequantized to float)."""
    if gguf_source.is_gguf(source):
        return gguf_source.describe(source)
    return {"format": "hf", "path": source}


def load_config(source: str):
    """The model's config; an unreadable ``config.json`` (or a hub id without one) is a UserError, not a traceback."""
    from transformers import AutoConfig

    folder = weights_folder(source)
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if Path(source).expanduser().is_dir():
            raise UserError(f"model folder {source} has an unreadable config.json: {first_line(e)}") from e
        raise UserError(f"model {source}: its config cannot be loaded ({first_line(e)})") from e


def check_pattern_fits(model: str | None, m: int) -> None:
    """Before loading weights: an N:M pattern's M must divide the hidden size (every attention projection's row
    length), read from the model's config."""
    if not m or model is None:
        return
    config = load_config(model_source(model))
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if isinstance(hidden, int) and hidden % m:
        raise UserError(f"pattern N:{m} does not fit {model}: its hidden size {hidden} is not a multiple of {m}")


def default_seqlen(model, requested: int | None, builtin: bool = False) -> int:
    """The protocol sequence length: as requested; else the built-in model's 256, or 2048 capped by the model's
    own context (never blindly ``max_position_embeddings``, which can be 32768)."""
    if requested is not None:
        if requested < 2:
            raise UserError(f"--seqlen must be at least 2, got {requested}")
        return requested
    if builtin:
        from prunesearch.default_model import DEFAULT_SEQLEN

        return DEFAULT_SEQLEN
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(2048, limit) if limit else 2048
