"""Where calibration, evaluation and held-out text comes from, and the protocol record that says so.

Every dataset name goes through one resolver, :func:`resolve`, so that :func:`describe` reports exactly which
file or hub dataset a run used. For ``c4``, ``wikitext2`` and ``ptb`` the order is: a data folder laid out like
``shared/data`` (``--data-dir`` / ``PRUNESEARCH_DATA_DIR``), then the Hugging Face hub when reachable, then the
corpus bundled with prunesearch. Offline C4 is the 1000-document train sample: documents 0-899 are the training
side (calibration), 900-949 the search's held-out fitness side, 950-999 the C4 perplexity/report side, because no
C4 validation file exists offline; the two held-out sides never overlap, so a search never reports on the text it
was tuned on. ``prunesearch.data`` turns a resolved plan into token windows.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prunesearch.safety import UserError, first_line

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
class Plan:
    """Where one role's text comes from: ``texts()`` loads the documents, ``joiner`` None means keep them apart."""

    record: dict
    key: str
    texts: Callable[[], Sequence[str]]
    joiner: str | None


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def read_text(path: Path) -> str:
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
    for number, line in enumerate(_lines(read_text(path)), start=1):
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


def _local_file(path: Path, role: str) -> Plan:
    """A user's .txt (one document stream) or .jsonl (one document per line, field ``text``)."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give c4, wikitext2, ptb or an existing .txt or .jsonl "
                        f"file")
    record = {"dataset": path.name, "role": role, "origin": "file", "file": str(path.resolve())}
    if path.suffix == ".txt":
        record["text"] = "the whole file as one stream"
        return Plan(record, _file_key(path), lambda: [read_text(path)], "")
    if path.suffix == ".jsonl":
        joiner = "\n\n" if role == "evaluation" else None
        record["text"] = "field 'text' of every line" + (" joined with '\\n\\n'" if joiner else ", one document each")
        return Plan(record, _file_key(path), lambda: _read_jsonl(path), joiner)
    raise UserError(f"data file {path} must end in .txt (one text stream) or .jsonl (one JSON document per line)")


def _c4_hub(role: str) -> Plan:
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
    return Plan(record, f"hub:{name}:{files[split]}:{record['split']}", texts, " " if role == "evaluation" else None)


def _c4(role: str, data_dir: Path | None) -> tuple[Plan | None, str]:
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
    return Plan(record, key, _c4_documents(path, docs), " " if role == "evaluation" else None), ""


def _wikitext2_or_ptb(name: str, role: str, data_dir: Path | None) -> tuple[Plan | None, str]:
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
            return Plan(record, _file_key(path), lambda: [read_text(path)], ""), ""
        record["text"] = "stripped lines joined with ' '" if name == "ptb" else "lines joined with ' '"
        if role == "calibration":
            record["note"] = "the reference calibrates on the train split, which is not available offline"
        strip = name == "ptb"
        return Plan(record, _file_key(path),
                     lambda: [line.strip() if strip else line for line in _lines(read_text(path))], joiner), ""
    if hub_reachable():
        dataset, config = HUB_WIKITEXT2 if name == "wikitext2" else HUB_PTB
        field = "text" if name == "wikitext2" else "sentence"
        split = {"evaluation": "test", "calibration": "train", "heldout": "validation"}[role]
        record = {"dataset": name, "role": role, "origin": "hub", "hub": f"{dataset}/{config}", "split": split,
                  "text": f"field '{field}' joined with {joiner!r}"}
        return Plan(record, f"hub:{dataset}:{config}:{split}", _hub(dataset, config, split, field), joiner), ""
    if name == "wikitext2" and evaluation:
        record = {"dataset": name, "role": role, "origin": "bundled", "file": str(BUNDLED_WIKITEXT2_TEST.resolve()),
                  "split": "test", "text": "test rows joined with '\\n\\n'"}
        return Plan(record, _file_key(BUNDLED_WIKITEXT2_TEST), lambda: [read_text(BUNDLED_WIKITEXT2_TEST)],
                     ""), ""
    what = {"evaluation": "test split", "calibration": "train or validation split (for calibration)",
            "heldout": "validation split (for search fitness)"}[role]
    return None, f"the bundled corpus has no {name} {what}"


def resolve(source: str, role: str, data_dir: str | Path | None) -> Plan:
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


def mix_parts(source: str) -> list[str]:
    """The datasets of a held-out mix such as ``c4+wikitext2`` (one name: itself); its windows alternate between
    them, so that every prefix (the early-stopping rung) holds each part nearly equally."""
    parts = source.split("+")
    if len(parts) > 1 and (len(set(parts)) != len(parts) or any(p not in NAMES for p in parts)):
        raise UserError(f"a held-out mix joins distinct names of {', '.join(NAMES)} with '+' (c4+wikitext2), "
                        f"got {source!r}")
    return parts


def describe(source: str, data_dir: str | Path | None = None, role: str | None = None) -> dict:
    """The protocol record of what ``source`` resolves to, for one role or (default) every role it has."""
    resolve_data_dir(data_dir)
    if role == "heldout" and len(parts := mix_parts(source)) > 1:
        return {"mix": source, "windows": f"alternating {', '.join(parts)}, each drawn with the run's seed",
                "parts": [describe(part, data_dir, role) for part in parts]}
    if role is not None:
        return dict(resolve(source, role, data_dir).record, tokens="no special tokens added")
    roles = ROLES if source == "c4" else ROLES[:2]
    out: dict = {"dataset": source, "tokens": "no special tokens added"}
    for r in roles:
        try:
            record = dict(resolve(source, r, data_dir).record)
        except DataUnavailable as e:
            if source not in NAMES:
                raise
            record = {"unavailable": str(e)}
        record.pop("role", None)
        out[r] = record
    return out


def bundled_c4_documents() -> list[str]:
    """All 1000 documents of the bundled C4 sample (0-899 training side, 900-999 held out)."""
    return _read_jsonl(BUNDLED_C4)


def bundled_wikitext2_test() -> str:
    """The bundled WikiText-2 raw test split as the reference evaluates it (rows joined with "\\n\\n")."""
    return read_text(BUNDLED_WIKITEXT2_TEST)
