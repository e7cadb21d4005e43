"""Token data for calibration, perplexity evaluation and held-out search fitness, drawn as SparseGPT/Wanda do.

Which text a name stands for is ``prunesearch.sources``' job (``describe`` says what a run read); here texts are
tokenized without special tokens, their ids cached on disk per tokenizer and source, and cut into windows.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from prunesearch.cache import cache_dir
from prunesearch.safety import UserError
from prunesearch.sources import Plan, describe, mix_parts, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_ids", "eval_ids", "heldout_ids", "describe"]

CACHE_FORMAT = "tokens-v1"


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the ids: the serialized fast tokenizer, else its name and vocab size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(tokenizer: PreTrainedTokenizerBase, plan: Plan, kind: str) -> Path:
    key = f"{CACHE_FORMAT}|{kind}|{_tokenizer_fingerprint(tokenizer)}|{plan.key}|{plan.joiner!r}"
    return cache_dir("tokens") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically so that a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path, *keys: str) -> dict[str, np.ndarray] | None:
    """A token-id cache file, or None when absent or unreadable (a truncated file is recomputed, not fatal)."""
    if not path.is_file():
        return None
    try:
        arrays = load_file(str(path))
        if all(k in arrays for k in keys):
            return arrays
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
        pass
    from prunesearch.files import warn

    warn(f"token cache {path} is unreadable; recomputing it")
    return None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def _stream_ids(tokenizer: PreTrainedTokenizerBase, plan: Plan) -> np.ndarray:
    """The joined text of a plan tokenized once (cached)."""
    path = _cache_path(tokenizer, plan, "stream")
    cached = _load(path, "ids")
    if cached is not None:
        return cached["ids"]
    ids = _encode(tokenizer, plan.joiner.join(plan.texts()))
    _save(path, {"ids": ids})
    return ids


class _DocumentIds:
    """Token ids of a plan's documents, tokenized one by one when first drawn and kept in the cache."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, plan: Plan):
        self.tokenizer, self.plan = tokenizer, plan
        self.path = _cache_path(tokenizer, plan, "docs")
        self.ids: dict[int, np.ndarray] = {}
        self.count: int | None = None
        self._texts: Sequence[str] | None = None
        self.dirty = False
        t = _load(self.path, "count", "index", "offsets", "ids")
        if t is not None:
            self.count = int(t["count"][0])
            for i, a, b in zip(t["index"].tolist(), t["offsets"][:-1].tolist(), t["offsets"][1:].tolist()):
                self.ids[i] = t["ids"][a:b]

    def texts(self) -> Sequence[str]:
        if self._texts is None:
            self._texts = self.plan.texts()
            self.count = len(self._texts)
        return self._texts

    def __len__(self) -> int:
        return self.count if self.count is not None else len(self.texts())

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self.ids:
            self.ids[i] = _encode(self.tokenizer, self.texts()[i])
            self.dirty = True
        return self.ids[i]

    def save(self) -> None:
        if not self.dirty:
            return
        index = sorted(self.ids)
        lengths = np.array([len(self.ids[i]) for i in index], dtype=np.int64)
        _save(self.path, {"count": np.array([len(self)], dtype=np.int64), "index": np.array(index, dtype=np.int64),
                          "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                          "ids": np.concatenate([self.ids[i] for i in index] or [np.zeros(0, np.int32)])})
        self.dirty = False


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if nsamples < 1:
        raise UserError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 1:
        raise UserError(f"seqlen must be at least 1, got {seqlen}")


def _windows_from_stream(ids: np.ndarray, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """Reference rule for a stream: ``random.seed(seed)``, then each window starts at ``randint(0, N-seqlen-1)``."""
    if len(ids) <= seqlen:
        raise UserError(f"{what} has {len(ids)} tokens, too few for windows of {seqlen}; use a smaller seqlen or "
                        f"more text")
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        start = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start:start + seqlen])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _windows_from_documents(docs: _DocumentIds, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """Reference rule for documents: redraw a random document until it is longer than seqlen, then a window."""
    rng = random.Random(seed)
    short: set[int] = set()
    rows = []
    try:
        for _ in range(nsamples):
            while True:
                i = rng.randint(0, len(docs) - 1)
                ids = docs[i]
                if len(ids) > seqlen:
                    break
                short.add(i)
                if len(short) == len(docs):
                    longest = max(len(docs[j]) for j in range(len(docs)))
                    raise UserError(f"no document of {what} is longer than {seqlen} tokens (longest: {longest}); "
                                    f"use a smaller seqlen or longer documents")
            start = rng.randint(0, len(ids) - seqlen - 1)
            rows.append(ids[start:start + seqlen])
    finally:
        docs.save()
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _what(plan: Plan) -> str:
    return f"{plan.record['dataset']} ({plan.record['role']})"


def calibration_ids(tokenizer: PreTrainedTokenizerBase, source: str, nsamples: int, seqlen: int, seed: int = 0,
                    data_dir: str | Path | None = None) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calibration text, drawn as SparseGPT/Wanda do."""
    _check_sizes(nsamples, seqlen)
    plan = resolve(source, "calibration", data_dir)
    if plan.joiner is None:
        return _windows_from_documents(_DocumentIds(tokenizer, plan), nsamples, seqlen, seed, _what(plan))
    return _windows_from_stream(_stream_ids(tokenizer, plan), nsamples, seqlen, seed, _what(plan))


def eval_ids(tokenizer: PreTrainedTokenizerBase, name: str, data_dir: str | Path | None = None) -> torch.LongTensor:
    """The whole evaluation text of ``name`` tokenized once, shape (1, N), for the perplexity protocol."""
    plan = resolve(name, "evaluation", data_dir)
    return torch.from_numpy(_stream_ids(tokenizer, plan).astype(np.int64)).unsqueeze(0)


def heldout_ids(tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0,
                data_dir: str | Path | None = None, source: str = "c4") -> torch.LongTensor:
    """Random windows of held-out text, the search's fitness and KL data: C4 documents never used for calibration
    or reports, or the validation split of WikiText-2 / PTB (never their test split), or a mix of them such as
    ``c4+wikitext2`` whose windows alternate between the parts (the first N of a longer draw are the N-window draw)."""
    _check_sizes(nsamples, seqlen)
    parts = mix_parts(source)
    if len(parts) > 1:
        k = len(parts)
        drawn = [heldout_ids(tokenizer, (nsamples - i + k - 1) // k, seqlen, seed, data_dir, part)
                 for i, part in enumerate(parts[:nsamples])]
        return torch.stack([drawn[j % k][j // k] for j in range(nsamples)])
    plan = resolve(source, "heldout", data_dir)
    if plan.joiner is None:
        return _windows_from_documents(_DocumentIds(tokenizer, plan), nsamples, seqlen, seed, _what(plan))
    return _windows_from_stream(_stream_ids(tokenizer, plan), nsamples, seqlen, seed, _what(plan))
