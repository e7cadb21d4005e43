"""Zero-shot tasks on the in-memory model through lm-eval's Hugging Face backend.

Offline (a data folder laid out like ``shared/data``): the seven tasks below are defined here over the local
files, with the prompts, choices and metrics of lm-eval's stock task definitions, and scored with lm-eval's
``HFLM.loglikelihood``. Online (no data folder): lm-eval's own tasks by their stock names via
``simple_evaluate``. Result: ``{"results": {task: {metric: value}}, "protocol": {...}}``.
"""

from __future__ import annotations

import bz2
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_OFFLINE = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada_openai", "hellaswag")


@dataclass
class Doc:
    """One example: a context per choice (one shared context for most tasks), continuations, and the gold index."""

    contexts: list[str]
    continuations: list[str]
    gold: int


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa(root: Path) -> list[Doc]:
    rows = _jsonl(root / "piqa/valid.jsonl")
    labels = [int(x) for x in (root / "piqa/valid-labels.lst").read_text().split()]
    return [Doc([f"Question: {r['goal']}\nAnswer:"], [f" {r['sol1']}", f" {r['sol2']}"], y)
            for r, y in zip(rows, labels)]


def _arc(path: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(path):
        labels = [c["label"] for c in r["question"]["choices"]]
        docs.append(Doc([f"Question: {r['question']['stem']}\nAnswer:"],
                        [f" {c['text']}" for c in r["question"]["choices"]], labels.index(r["answerKey"])))
    return docs


def _winogrande(root: Path) -> list[Doc]:
    """Partial scoring as lm-eval: each option fills the blank in its own context; the rest is the continuation."""
    docs = []
    for r in _jsonl(root / "winogrande/winogrande_1.1/dev.jsonl"):
        cut = r["sentence"].index("_")
        rest = " " + r["sentence"][cut + 1:].strip()
        docs.append(Doc([r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]], [rest, rest],
                        int(r["answer"]) - 1))
    return docs


def _boolq(root: Path) -> list[Doc]:
    return [Doc([f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"], [" no", " yes"], int(bool(r["answer"])))
            for r in _jsonl(root / "boolq/dev.jsonl")]


def _lambada(root: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(root / "lambada_openai/lambada_test.jsonl"):
        context, word = r["text"].rsplit(" ", 1)
        docs.append(Doc([context], [f" {word}"], 0))
    return docs


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ' [title]' → '. ', drop [bracket] tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Path) -> list[Doc]:
    """From the 6-lines-per-item text export ("label: ctx", gold, 4 endings). lm-eval builds the query from
    ``ctx_a + " " + ctx_b.capitalize()``; the export holds that joined context already, so the only possible
    difference is the capitalisation of ``ctx_b``, which the export applied the same way."""
    lines = bz2.decompress((root / "hellaswag/hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").splitlines()
    docs = []
    for i in range(0, len(lines) - 5, 6):
        docs.append(Doc([hellaswag_preprocess(lines[i])], [" " + hellaswag_preprocess(e) for e in lines[i + 2:i + 6]],
                        int(lines[i + 1])))
    return docs


TASKS: dict[str, tuple[str, Callable[[Path], list[Doc]]]] = {
    "piqa": ("piqa/valid.jsonl", _piqa),
    "arc_easy": ("arc/ARC-Easy/ARC-Easy-Test.jsonl", lambda root: _arc(root / "arc/ARC-Easy/ARC-Easy-Test.jsonl")),
    "arc_challenge": ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",
                      lambda root: _arc(root / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl")),
    "winogrande": ("winogrande/winogrande_1.1/dev.jsonl", _winogrande),
    "boolq": ("boolq/dev.jsonl", _boolq),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl", _lambada),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", _hellaswag),
}


def load_docs(task: str, data_dir: str | Path, limit: int | None = None) -> list[Doc]:
    """The examples of an offline task from a data folder; unknown tasks and missing files are clear errors."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} has no offline definition; supported: {', '.join(SUPPORTED_OFFLINE)}")
    root = Path(data_dir)
    if not (root / TASKS[task][0]).is_file():
        raise FileNotFoundError(f"task {task} needs {root / TASKS[task][0]}, which does not exist")
    docs = TASKS[task][1](root)
    return docs[:limit] if limit else docs


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_docs(lm, task: str, docs: list[Doc]) -> dict[str, float]:
    """acc / acc_norm (log-likelihood per byte of the choice, as lm-eval) with stderr; LAMBADA: acc and PPL."""
    from lm_eval.api.instance import Instance

    requests = []
    for d in docs:
        for j, cont in enumerate(d.continuations):
            ctx = d.contexts[j] if len(d.contexts) > 1 else d.contexts[0]
            requests.append(Instance("loglikelihood", {}, (ctx, cont), len(requests)))
    out = lm.loglikelihood(requests, disable_tqdm=True)
    acc, acc_norm, lls = [], [], []
    k = 0
    for d in docs:
        scores = out[k:k + len(d.continuations)]
        k += len(d.continuations)
        if task == "lambada_openai":
            lls.append(scores[0][0])
            acc.append(float(scores[0][1]))
            continue
        ll = [s[0] for s in scores]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == d.gold))
        norm = [x / len(c.encode("utf-8")) for x, c in zip(ll, d.continuations)]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == d.gold))
    result = {"acc": sum(acc) / len(acc), "acc_stderr": _stderr(acc), "n": len(docs)}
    if task == "lambada_openai":
        result["perplexity"] = math.exp(-sum(lls) / len(lls))
    elif task != "winogrande":
        result["acc_norm"] = sum(acc_norm) / len(acc_norm)
        result["acc_norm_stderr"] = _stderr(acc_norm)
    return result


def evaluate_tasks(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
                   batch_size: int = 8, device: str | None = None, num_fewshot: int = 0) -> dict:
    """Zero-shot accuracy of an in-memory model: offline from ``data_dir`` (or PRUNESEARCH_DATA_DIR), else lm-eval's
    stock tasks online."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    data_dir = data_dir or os.environ.get("PRUNESEARCH_DATA_DIR")
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    protocol = {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
                "lm_eval_version": lm_eval.__version__}
    if data_dir:
        if num_fewshot:
            raise ValueError("offline tasks are zero-shot only")
        docs = {t: load_docs(t, data_dir, limit) for t in tasks}  # every file is checked before scoring
        results = {t: score_docs(lm, t, d) for t, d in docs.items()}
        protocol["source"] = f"local:{Path(data_dir).resolve()}"
        return {"results": results, "protocol": protocol}
    from prunesearch.data import hub_reachable

    if not hub_reachable():
        raise ValueError("zero-shot tasks need --data-dir (offline task files) or a reachable Hugging Face hub")
    raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    results = {t: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, (int, float))}
               for t, r in raw["results"].items()}
    protocol["source"] = "hub"
    return {"results": results, "protocol": protocol}
