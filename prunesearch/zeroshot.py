"""Zero-shot lm-eval tasks on an in-memory model: offline over a local data folder, online by stock task names.

``evaluate_tasks`` returns ``{"results": {task: {metric: value}}, "protocol": {...}}``. ``results`` holds, under the
plain task name, the numbers lm-eval reports (``acc``, ``acc_stderr``, and ``acc_norm``, ``acc_norm_stderr`` where the
stock task has them; LAMBADA ``perplexity``, ``perplexity_stderr``, ``acc``, ``acc_stderr``) and ``sample_len``, the
number of documents scored. ``protocol`` records how: ``tasks``, ``source`` (``"local:<data dir>"`` or ``"hub"``),
``task_dir`` (the offline task folder, else None), ``limit``, ``num_fewshot``, ``bootstrap_iters``,
``lm_eval_version`` and ``task_versions``.

Offline, every task is an lm-eval YAML in ``cache_dir("lm_eval_tasks", <hash of the data dir>)`` that copies the
prompt, choices, target and metrics of lm-eval's stock task, adapted to the field layout of the local file, and reads
that file with the ``datasets`` ``json`` builder. The tasks are named ``ps_<task>`` so they never shadow stock tasks;
the folder also works as ``lm_eval --include_path``. PIQA (labels in a separate file) and HellaSwag (a text export)
are first converted to jsonl in the same folder, once.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunesearch.cache import cache_dir
from prunesearch.safety import UserError

SUPPORTED_OFFLINE = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada_openai", "hellaswag")
PREFIX = "ps_"
BOOTSTRAP_ITERS = 1000  # resamples for the perplexity stderr; lm-eval's default of 100000 takes minutes on CPU
_FORMAT = 1  # part of the task folder's name: bump it when a conversion or a task definition changes

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow artefacts): ' [title]' becomes '. ', other [tags] go, '  ' becomes ' '."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(lines: list[str]) -> dict[str, Any]:
    """One HellaSwag item from its six export lines ("activity_label: ctx", gold, four endings) as lm-eval builds it.

    lm-eval's query is ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; the export keeps
    only ``ctx`` (ctx_a and ctx_b joined, ctx_b not capitalised), already stripped of [header], [step], [substeps] and
    [title] tags. ctx_b is taken to be what follows the last sentence end of ``ctx`` when ``ctx`` does not itself end a
    sentence (3241 of the 10042 items; every such tail is lower case, so this matches lm-eval wherever the split
    guess is right); a ctx_b that starts a new sentence is left as exported. lm-eval's other tag removal and space
    collapsing run again on the exported text, so only rare runs of adjacent tags can leave a space more or less.
    """
    head, label, *endings = lines
    activity, ctx = head.split(": ", 1)
    if ctx and ctx[-1] not in ".!?\"'":
        cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
        start = cut + 2 if cut >= 0 else 0
        ctx = ctx[:start] + ctx[start:].capitalize()
    return {"query": hellaswag_preprocess(f"{activity}: {ctx}"),
            "choices": [hellaswag_preprocess(e) for e in endings], "label": int(label)}


def _hellaswag_rows(data_dir: Path) -> Iterator[dict[str, Any]]:
    """The items of the 6-lines-per-item export, in file order."""
    path = data_dir / "hellaswag/hellaswag_val_full.txt.bz2"
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path} has {len(lines)} lines; the HellaSwag text export has 6 lines per item")
    for i in range(0, len(lines), 6):
        yield hellaswag_doc(lines[i:i + 6])


def _piqa_rows(data_dir: Path) -> Iterator[dict[str, Any]]:
    """PIQA validation rows with their label from the aligned labels file, as in the stock dataset."""
    rows = (data_dir / "piqa/valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (data_dir / "piqa/valid-labels.lst").read_text().split()
    if len(rows) != len(labels):
        raise UserError(f"piqa/valid.jsonl has {len(rows)} rows but piqa/valid-labels.lst has {len(labels)} labels "
                        f"in {data_dir}; the two files must be aligned line by line")
    for row, label in zip(rows, labels):
        yield {**json.loads(row), "label": int(label)}


@dataclass(frozen=True)
class _LocalTask:
    """An offline task: its files in the data folder, the split the stock task scores, and its lm-eval fields."""

    sources: tuple[str, ...]
    split: str
    fields: dict[str, Any]
    convert: Callable[[Path], Iterator[dict[str, Any]]] | None = None


def _arc(name: str) -> _LocalTask:
    """ARC from the original jsonl (question.stem, question.choices[{text, label}], answerKey 'A'.. or '1'..)."""
    return _LocalTask((f"arc/{name}/{name}-Test.jsonl",), "test", {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question.stem}}\nAnswer:",
        "doc_to_target": "{{(question.choices | map(attribute='label') | list).index(answerKey)}}",
        "doc_to_choice": "{{question.choices | map(attribute='text') | list}}",
        "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}})


_TASKS: dict[str, _LocalTask] = {
    "piqa": _LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}}, _piqa_rows),
    "arc_easy": _arc("ARC-Easy"),
    "arc_challenge": _arc("ARC-Challenge"),
    # Stock preprocess_winogrande as templates: each option fills the blank in its own context (partial scoring).
    "winogrande": _LocalTask(("winogrande/winogrande_1.1/dev.jsonl",), "validation", {
        "output_type": "multiple_choice",
        "doc_to_text": "{{(answer | int) - 1}}",
        "doc_to_target": "{{sentence[sentence.index('_') + 1:].strip()}}",
        "doc_to_choice": "{{[sentence[:sentence.index('_')] + option1, sentence[:sentence.index('_')] + option2]}}",
        "metric_list": [_ACC], "metadata": {"version": 1.0}}),
    "boolq": _LocalTask(("boolq/dev.jsonl",), "validation", {
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "{{answer | int}}",
        "doc_to_choice": ["no", "yes"], "metric_list": [_ACC], "metadata": {"version": 2.0}}),
    "lambada_openai": _LocalTask(("lambada_openai/lambada_test.jsonl",), "test", {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, _ACC],
        "metadata": {"version": 1.0}}),
    "hellaswag": _LocalTask(("hellaswag/hellaswag_val_full.txt.bz2",), "validation", {
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
        "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0}}, _hellaswag_rows),
}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _converted(task: str, spec: _LocalTask, data_dir: Path, folder: Path) -> Path:
    """The jsonl lm-eval reads, written once into ``folder`` and rewritten only when a source file is newer."""
    out = folder / f"{task}.jsonl"
    newest = max((data_dir / s).stat().st_mtime_ns for s in spec.sources)
    if not out.exists() or out.stat().st_mtime_ns < newest:
        rows = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in spec.convert(data_dir))
        _write_atomically(out, rows)
    return out


def task_dir(data_dir: str | Path) -> Path:
    """The cache folder that holds the offline task YAMLs and converted files of one data folder."""
    root = Path(data_dir).expanduser().resolve()
    return cache_dir("lm_eval_tasks", hashlib.sha256(f"{root}|{_FORMAT}".encode()).hexdigest()[:16])


def prepare_offline_tasks(tasks: list[str], data_dir: str | Path) -> Path:
    """Check the tasks' files, convert what needs it and write the ``ps_<task>`` YAMLs; returns their folder."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data_dir {root} is not a directory; pass a folder laid out like shared/data")
    for task in tasks:
        if task not in _TASKS:
            raise UserError(f"task {task!r} has no offline definition; "
                            f"supported offline: {', '.join(SUPPORTED_OFFLINE)}")
        for source in _TASKS[task].sources:
            if not (root / source).is_file():
                files = "; ".join(f"{t}: {', '.join(s.sources)}" for t, s in _TASKS.items())
                raise UserError(f"task {task!r} needs {root / source}, which does not exist; "
                                f"supported offline tasks and their files: {files}")
    folder = task_dir(root)
    for task in tasks:
        spec = _TASKS[task]
        data_file = _converted(task, spec, root, folder) if spec.convert else root / spec.sources[0]
        config = {"task": PREFIX + task, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {spec.split: str(data_file)},
                                     "cache_dir": str(cache_dir("hf_datasets"))},
                  f"{spec.split}_split": spec.split, "num_fewshot": 0, **spec.fields}
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        path = folder / f"{PREFIX}{task}.yaml"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            _write_atomically(path, text)
    return folder


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _offline() -> Iterator[None]:
    """Keep ``datasets`` off the hub and lm-eval's bootstrap in this process (no fork of a process holding a model)."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        with _environ(HF_DATASETS_OFFLINE="1", DISABLE_MULTIPROC="1"):
            yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def offline_tasks(tasks: list[str], data_dir: str | Path) -> dict[str, Any]:
    """The offline tasks as lm-eval ``Task`` objects (documents loaded), keyed by plain task name."""
    from lm_eval.tasks import TaskManager

    folder = prepare_offline_tasks(tasks, data_dir)
    with _offline():
        loaded = TaskManager(include_path=str(folder), include_defaults=False).load([PREFIX + t for t in tasks])
    return {t: loaded["tasks"][PREFIX + t] for t in tasks}


def evaluate_tasks(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
                   batch_size: int = 8, device: str | None = None, num_fewshot: int = 0) -> dict[str, dict[str, Any]]:
    """Score zero-shot tasks with lm-eval: offline from ``data_dir`` (or ``PRUNESEARCH_DATA_DIR``), else from the hub.

    ``limit`` scores only the first documents of each task. Returns ``{"results": ..., "protocol": ...}`` as described
    in the module docstring; the model is scored where its weights are (``device`` goes to lm-eval's ``HFLM``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("tasks is empty; name at least one task, e.g. " + ", ".join(SUPPORTED_OFFLINE))
    data_dir = data_dir or os.environ.get("PRUNESEARCH_DATA_DIR")
    if data_dir and num_fewshot:
        raise UserError(f"num_fewshot={num_fewshot} with a data_dir: offline tasks have no training split to draw "
                        "shots from; use num_fewshot=0 or the hub tasks")
    protocol: dict[str, Any] = {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
                                "bootstrap_iters": BOOTSTRAP_ITERS, "lm_eval_version": lm_eval.__version__}
    if data_dir:
        specs: list[Any] = list(offline_tasks(tasks, data_dir).values())
        manager, context = TaskManager(include_defaults=False), _offline()
        protocol |= {"source": f"local:{Path(data_dir).expanduser().resolve()}", "task_dir": str(task_dir(data_dir))}
    else:
        from prunesearch.sources import hub_reachable

        if not hub_reachable():
            raise UserError("zero-shot tasks need a data_dir (or PRUNESEARCH_DATA_DIR) with the offline task files, "
                            "or a reachable Hugging Face hub for the stock tasks")
        specs, manager, context = list(tasks), TaskManager(), _environ(DISABLE_MULTIPROC="1")
        protocol |= {"source": "hub", "task_dir": None}
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with context:
        raw = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None)

    def plain(name: str) -> str:
        return name.removeprefix(PREFIX) if data_dir else name

    results = {plain(name): {key.split(",")[0]: value for key, value in metrics.items()
                             if isinstance(value, (int, float)) and not isinstance(value, bool)}
               for name, metrics in raw["results"].items()}
    protocol["task_versions"] = {plain(name): version for name, version in raw.get("versions", {}).items()}
    return {"results": results, "protocol": protocol}
