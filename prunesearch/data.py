"""Token data for calibration, perplexity evaluation and held-out search fitness, following SparseGPT/Wanda.

Every dataset name goes through one resolver, :func:`_resolve`, so that :func:`describe` reports exactly which
file or hub dataset a run used. For ``c4``, ``wikitext2`` and ``ptb`` the order is: a data folder laid out like
``shared/data`` (``--data-dir`` / ``PRUNESEARCH_DATA_DIR``), then the Hugging Face hub when reachable, then the
corpus bundled with prunesearch. Offline C4 is the 1000-document train sample: documents 0-899 are the training
side (calibration), 900-949 the search's held-out fitness side, 950-999 the C4 perplexity/report side, because no
C4 validation file exists offline; the two held-out sides never overlap, so a search never reports on the text it
was tuned on. Texts are tokenized without special tokens and the ids are cached on disk per tokenizer and source.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from prunesearch.cache import cache_dir
from prunesearch.safety import UserError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMES = ("c4", "wikitext2", "ptb")
ROLES = ("calibration", "evaluation", "heldout")
CORPUS = Path(__file__).parent / "corpus"
BUNDLED_C4 = CORPUS / "c4_en_train_first1000.jsonl.gz"
BUNDLED_WIKITEXT2_TEST = CORPUS / "wikitext2_raw_test.txt.gz"
C4_TRAIN_DOCS = range(0, 900)
C4_HELDOUT_DOCS = range(900, 950)  # search fitness
C4_REPORT_DOCS = range(950, 1000)  # C4 perplexity and reports (``eval_ids("c4")``)
C4_EVAL_DOCS = 1100  # the reference joins the first 1100 validation documents
LOCAL_FILES = {  # paths inside a data folder laid out like shared/data
    ("c4", "train"): "c4_sample/c4_en_train_first1000/c4_sample.jsonl",
    ("wikitext2", "test"): "wikitext2_raw/rotorquant/wikitext-test.txt",
    ("wikitext2", "validation"): "wikitext2_raw/voltagepark/wikitext2_validation.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
}
HUB_C4 = ("allenai/c4", {"train": "en/c4-train.00000-of-01024.json.gz",
                         "validation": "en/c4-validation.00000-of-00008.json.gz"})
HUB_WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1")
HUB_PTB = ("ptb_text_only", "penn_treebank")
CACHE_FORMAT = "tokens-v1"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PRUNESEARCH_OFFLINE")


class DataUnavailable(UserError):
    """A named dataset has no text for a role here: not in the data folder, hub unreachable, not bundled."""


def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be used: not forced offline and huggingface.co answers (probed once)."""
    if any(os.environ.get(name) == "1" for name in OFFLINE_ENV):
        return False
    return _probe_hub()


@functools.lru_cache(maxsize=1)
def _probe_hub() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data folder to use: the argument, else ``PRUNESEARCH_DATA_DIR``, else None; a missing folder is an error."""
    value = data_dir if data_dir is not None else os.environ.get("PRUNESEARCH_DATA_DIR") or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist; give --data-dir (or PRUNESEARCH_DATA_DIR) a folder "
                        f"laid out like shared/data")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Resolution: a name and a role become a plan (where the text comes from, how it is formed, how it is described).


@dataclass(frozen=True)
class _Plan:
    """Where one role's text comes from: ``texts()`` loads the documents, ``joiner`` None means keep them apart."""

    record: dict
    key: str
    texts: Callable[[], Sequence[str]]
    joiner: str | None


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_text(path: Path) -> str:
    """A text file (optionally gzipped) with universal newlines, so CRLF files read as LF; one that is not UTF-8
    text is a UserError naming it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data file {path} cannot be read as UTF-8 text ({first_line(e)})") from e


def _lines(text: str) -> list[str]:
    """The lines of a file as ``for line in f`` yields them, without their newline."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every line of a (optionally gzipped) JSON-lines file."""
    texts = []
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e.msg}); each line must be a JSON object "
                            f"with a 'text' field") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {number} has no string 'text' field; each line must be a JSON object "
                            f"with a 'text' field")
        texts.append(row["text"])
    return texts


def _c4_documents(path: Path, docs: range) -> Callable[[], Sequence[str]]:
    def load() -> Sequence[str]:
        texts = _read_jsonl(path)
        if len(texts) < docs.stop:
            raise UserError(f"{path} has {len(texts)} documents; the C4 sample must hold at least {docs.stop}")
        return texts[docs.start:docs.stop]
    return load


def _hub(dataset: str, config: str | None, split: str, field: str, data_files: dict | None = None,
         start: int = 0, stop: int | None = None) -> Callable[[], Sequence[str]]:
    def load() -> Sequence[str]:
        from datasets import load_dataset

        if data_files is not None:
            ds = load_dataset(dataset, data_files={split: data_files[split]}, split=split)
        else:
            ds = load_dataset(dataset, config, split=split)
        end = len(ds) if stop is None else min(stop, len(ds))
        return ds.select(range(start, end))[field] if (start, end) != (0, len(ds)) else ds[field]
    return load


def _local_file(path: Path, role: str) -> _Plan:
    """A user's .txt (one document stream) or .jsonl (one document per line, field ``text``)."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give c4, wikitext2, ptb or an existing .txt or .jsonl "
                        f"file")
    record = {"dataset": path.name, "role": role, "origin": "file", "file": str(path.resolve())}
    if path.suffix == ".txt":
        record["text"] = "the whole file as one stream"
        return _Plan(record, _file_key(path), lambda: [_read_text(path)], "")
    if path.suffix == ".jsonl":
        joiner = "\n\n" if role == "evaluation" else None
        record["text"] = "field 'text' of every line" + (" joined with '\\n\\n'" if joiner else ", one document each")
        return _Plan(record, _file_key(path), lambda: _read_jsonl(path), joiner)
    raise UserError(f"data file {path} must end in .txt (one text stream) or .jsonl (one JSON document per line)")


def _c4_hub(role: str) -> _Plan:
    """C4 from the hub shards the reference uses: train shard 0 to calibrate, validation shard 0 otherwise."""
    name, files = HUB_C4
    split = "train" if role == "calibration" else "validation"
    record = {"dataset": "c4", "role": role, "origin": "hub", "hub": name, "data_files": files[split]}
    if role == "calibration":
        record["split"] = "train shard 00000, all documents"
        texts = _hub(name, None, split, "text", files)
    elif role == "evaluation":
        record["split"] = f"validation shard 00000, documents 0-{C4_EVAL_DOCS - 1}"
        record["text"] = "documents joined with ' ' (callers truncate to 256 * seqlen tokens)"
        texts = _hub(name, None, split, "text", files, 0, C4_EVAL_DOCS)
    else:
        record["split"] = f"validation shard 00000, documents {C4_EVAL_DOCS}-end (disjoint from evaluation)"
        texts = _hub(name, None, split, "text", files, C4_EVAL_DOCS)
    return _Plan(record, f"hub:{name}:{files[split]}:{record['split']}", texts, " " if role == "evaluation" else None)


def _c4(role: str, data_dir: Path | None) -> tuple[_Plan | None, str]:
    """C4: the local 1000-document train sample from the data folder, else the hub, else the bundled sample."""
    local = data_dir / LOCAL_FILES["c4", "train"] if data_dir is not None else None
    if local is not None and local.is_file():
        path, origin = local, "data_dir"
    elif hub_reachable():
        return _c4_hub(role), ""
    else:
        path, origin = BUNDLED_C4, "bundled"
    docs = {"calibration": C4_TRAIN_DOCS, "heldout": C4_HELDOUT_DOCS, "evaluation": C4_REPORT_DOCS}[role]
    record = {"dataset": "c4", "role": role, "origin": origin, "file": str(path.resolve()),
              "split": f"train shard 00000, documents {docs.start}-{docs.stop - 1}"}
    if role != "calibration":
        record["note"] = ("no C4 validation file offline: held-out documents of the train sample stand in for the "
                          "validation shard (900-949 for search fitness, 950-999 for evaluation, never overlapping)")
    if role == "evaluation":
        record["text"] = "documents joined with ' ' (callers truncate to 256 * seqlen tokens)"
    key = f"{_file_key(path)}:docs{docs.start}-{docs.stop}"
    return _Plan(record, key, _c4_documents(path, docs), " " if role == "evaluation" else None), ""


def _wikitext2_or_ptb(name: str, role: str, data_dir: Path | None) -> tuple[_Plan | None, str]:
    """WikiText-2 raw / PTB: test split for evaluation; train split (validation offline) for calibration; the
    validation split for held-out search fitness (never the test split a report reads)."""
    evaluation = role == "evaluation"
    # The reference joins WikiText-2 test rows with "\n\n", PTB sentences and all training text with " ".
    joiner = "\n\n" if evaluation and name == "wikitext2" else " "
    local_split = "test" if evaluation else "validation"
    if data_dir is not None and (data_dir / LOCAL_FILES[name, local_split]).is_file():
        path = data_dir / LOCAL_FILES[name, local_split]
        record = {"dataset": name, "role": role, "origin": "data_dir", "file": str(path.resolve()),
                  "split": local_split}
        if evaluation and name == "wikitext2":  # the file already is "\n\n".join(test rows)
            record["text"] = "the file (test rows joined with '\\n\\n'), CRLF read as LF"
            return _Plan(record, _file_key(path), lambda: [_read_text(path)], ""), ""
        record["text"] = "stripped lines joined with ' '" if name == "ptb" else "lines joined with ' '"
        if role == "calibration":
            record["note"] = "the reference calibrates on the train split, which is not available offline"
        strip = name == "ptb"
        return _Plan(record, _file_key(path),
                     lambda: [line.strip() if strip else line for line in _lines(_read_text(path))], joiner), ""
    if hub_reachable():
        dataset, config = HUB_WIKITEXT2 if name == "wikitext2" else HUB_PTB
        field = "text" if name == "wikitext2" else "sentence"
        split = {"evaluation": "test", "calibration": "train", "heldout": "validation"}[role]
        record = {"dataset": name, "role": role, "origin": "hub", "hub": f"{dataset}/{config}", "split": split,
                  "text": f"field '{field}' joined with {joiner!r}"}
        return _Plan(record, f"hub:{dataset}:{config}:{split}", _hub(dataset, config, split, field), joiner), ""
    if name == "wikitext2" and evaluation:
        record = {"dataset": name, "role": role, "origin": "bundled", "file": str(BUNDLED_WIKITEXT2_TEST.resolve()),
                  "split": "test", "text": "test rows joined with '\\n\\n'"}
        return _Plan(record, _file_key(BUNDLED_WIKITEXT2_TEST), lambda: [_read_text(BUNDLED_WIKITEXT2_TEST)],
                     ""), ""
    what = {"evaluation": "test split", "calibration": "train or validation split (for calibration)",
            "heldout": "validation split (for search fitness)"}[role]
    return None, f"the bundled corpus has no {name} {what}"


def _resolve(source: str, role: str, data_dir: str | Path | None) -> _Plan:
    """The single place where a dataset name or file path becomes a plan for one role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if source not in NAMES:
        path = Path(source).expanduser()
        if path.suffix in (".txt", ".jsonl") or path.exists() or os.sep in source:
            return _local_file(path, role)
        raise UserError(f"unknown dataset {source!r}; give c4, wikitext2, ptb, or a path to a .txt or .jsonl file")
    folder = resolve_data_dir(data_dir)
    plan, why = _c4(role, folder) if source == "c4" else _wikitext2_or_ptb(source, role, folder)
    if plan is not None:
        return plan
    split = "test" if role == "evaluation" else "validation"
    tried = (f"data folder {folder} has no {LOCAL_FILES[source, split]}" if folder is not None
             else "no data folder was given")
    raise DataUnavailable(
        f"no {source} text for {role}: {tried}, the Hugging Face hub is unreachable or disabled, and {why}; "
        f"pass --data-dir (or set PRUNESEARCH_DATA_DIR) to a folder laid out like shared/data"
    )


def describe(source: str, data_dir: str | Path | None = None, role: str | None = None) -> dict:
    """The protocol record of what ``source`` resolves to, for one role or (default) every role it has."""
    resolve_data_dir(data_dir)
    if role is not None:
        return dict(_resolve(source, role, data_dir).record, tokens="no special tokens added")
    roles = ROLES if source == "c4" else ROLES[:2]
    out: dict = {"dataset": source, "tokens": "no special tokens added"}
    for r in roles:
        try:
            record = dict(_resolve(source, r, data_dir).record)
        except DataUnavailable as e:
            if source not in NAMES:
                raise
            record = {"unavailable": str(e)}
        record.pop("role", None)
        out[r] = record
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with an on-disk id cache.


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the ids: the serialized fast tokenizer, else its name and vocab size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(tokenizer: PreTrainedTokenizerBase, plan: _Plan, kind: str) -> Path:
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


def _stream_ids(tokenizer: PreTrainedTokenizerBase, plan: _Plan) -> np.ndarray:
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, plan: _Plan):
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


def _what(plan: _Plan) -> str:
    return f"{plan.record['dataset']} ({plan.record['role']})"


def calibration_ids(tokenizer: PreTrainedTokenizerBase, source: str, nsamples: int, seqlen: int, seed: int = 0,
                    data_dir: str | Path | None = None) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calibration text, drawn as SparseGPT/Wanda do."""
    _check_sizes(nsamples, seqlen)
    plan = _resolve(source, "calibration", data_dir)
    if plan.joiner is None:
        return _windows_from_documents(_DocumentIds(tokenizer, plan), nsamples, seqlen, seed, _what(plan))
    return _windows_from_stream(_stream_ids(tokenizer, plan), nsamples, seqlen, seed, _what(plan))


def eval_ids(tokenizer: PreTrainedTokenizerBase, name: str, data_dir: str | Path | None = None) -> torch.LongTensor:
    """The whole evaluation text of ``name`` tokenized once, shape (1, N), for the perplexity protocol."""
    plan = _resolve(name, "evaluation", data_dir)
    return torch.from_numpy(_stream_ids(tokenizer, plan).astype(np.int64)).unsqueeze(0)


def heldout_ids(tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0,
                data_dir: str | Path | None = None, source: str = "c4") -> torch.LongTensor:
    """Random windows of held-out text, the search's fitness and KL data: C4 documents never used for calibration
    or reports, or the validation split of WikiText-2 / PTB (never their test split)."""
    _check_sizes(nsamples, seqlen)
    plan = _resolve(source, "heldout", data_dir)
    if plan.joiner is None:
        return _windows_from_documents(_DocumentIds(tokenizer, plan), nsamples, seqlen, seed, _what(plan))
    return _windows_from_stream(_stream_ids(tokenizer, plan), nsamples, seqlen, seed, _what(plan))


def bundled_c4_documents() -> list[str]:
    """All 1000 documents of the bundled C4 sample (0-899 training side, 900-999 held out)."""
    return _read_jsonl(BUNDLED_C4)


def bundled_wikitext2_test() -> str:
    """The bundled WikiText-2 raw test split as the reference evaluates it (rows joined with "\\n\\n")."""
    return _read_text(BUNDLED_WIKITEXT2_TEST)
