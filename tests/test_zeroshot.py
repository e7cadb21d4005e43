"""Offline zero-shot tasks: lm-eval documents built from local files as the stock tasks build them, and scores that
equal a hand computation with the model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from prunesearch.zeroshot import (
    SUPPORTED_OFFLINE,
    evaluate_tasks,
    hellaswag_doc,
    offline_tasks,
    prepare_offline_tasks,
)

DATA = Path(__file__).parent / "fixtures" / "shared_data"
ROWS = 6  # items per fixture file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNESEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def model():
    config = tiny_config("llama")
    config.max_position_embeddings = 2048  # the tiny tokenizer spells BoolQ passages nearly byte by byte
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def evaluation(cache, model, tiny_tokenizer):
    return evaluate_tasks(model, tiny_tokenizer, list(SUPPORTED_OFFLINE), DATA, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def tasks(cache):
    return offline_tasks(list(SUPPORTED_OFFLINE), DATA)


def test_every_offline_task_scores_every_fixture_row(evaluation):
    results, protocol = evaluation["results"], evaluation["protocol"]
    assert set(results) == set(SUPPORTED_OFFLINE)
    for task, r in results.items():
        assert r["sample_len"] == ROWS and 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] >= 0.0, task
    for task in ("piqa", "arc_easy", "arc_challenge", "hellaswag"):
        assert 0.0 <= results[task]["acc_norm"] <= 1.0
    assert "acc_norm" not in results["boolq"] and "acc_norm" not in results["winogrande"]
    assert results["lambada_openai"]["perplexity"] > 1.0
    assert protocol["source"] == f"local:{DATA.resolve()}"
    assert protocol["num_fewshot"] == 0 and protocol["limit"] is None and protocol["task_versions"]["boolq"] == 2.0
    yamls = sorted(p.name for p in Path(protocol["task_dir"]).glob("*.yaml"))
    assert yamls == sorted(f"ps_{t}.yaml" for t in SUPPORTED_OFFLINE)


def test_documents_are_built_like_the_stock_tasks(tasks):
    hs = tasks["hellaswag"]
    first, wikihow = hs.eval_docs[0], hs.eval_docs[5]
    assert hs.doc_to_text(first) == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b.capitalize()
    assert hs.doc_to_choice(first)[3] == "starts pulling up roofing on a roof." and hs.doc_to_target(first) == 3
    assert "Visit a site like to find loads" in hs.doc_to_text(wikihow)  # "[www.kiddio.org]" removed, spaces collapsed
    assert hs.doc_to_target(wikihow) == 1

    piqa = tasks["piqa"]
    assert [piqa.doc_to_target(d) for d in piqa.eval_docs] == [0, 1, 1, 1, 0, 1]  # from valid-labels.lst
    assert piqa.doc_to_text(piqa.eval_docs[0]) == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:")
    assert len(piqa.doc_to_choice(piqa.eval_docs[0])) == 2

    arc = tasks["arc_easy"]
    docs = list(arc.eval_docs)
    assert arc.doc_to_text(docs[0]).startswith("Question: Which statement best explains why photosynthesis")
    assert arc.doc_to_choice(docs[0])[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert docs[4]["answerKey"] == "2" and arc.doc_to_target(docs[4]) == 1  # numeric answer keys
    assert len(arc.doc_to_choice(docs[5])) == 3

    wg = tasks["winogrande"]
    doc = wg.eval_docs[0]  # answer "2": the gold index is the context, scored with a shared continuation
    assert wg.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                     "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.doc_to_text(doc) == 1 and wg.doc_to_target(doc) == "always got the easier cases."

    boolq = tasks["boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert [boolq.doc_to_target(d) for d in boolq.eval_docs] == [1, 1, 1, 0, 0, 0]

    lam = tasks["lambada_openai"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_target(doc) == " signs" and lam.doc_to_text(doc) + lam.doc_to_target(doc) == doc["text"]


def test_hellaswag_capitalises_only_an_unfinished_last_sentence():
    lines = ["Label: One. the man", "0", "a", "b", "c", "d"]
    assert hellaswag_doc(lines)["query"] == "Label: One. The man"
    lines[0] = "Label: How to cook. Heat the pan [pan.jpg] first."
    assert hellaswag_doc(lines) == {"query": "Label: How to cook. Heat the pan first.", "choices": list("abcd"),
                                    "label": 0}


def _hand_scores(model, tokenizer, context: str, choices: list[str]) -> np.ndarray:
    """Summed log-probability of each " choice" after the context, tokenised as lm-eval's HFLM does."""
    ctx = tokenizer(context)["input_ids"]
    scores = []
    for choice in choices:
        whole = tokenizer(context + " " + choice)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return np.array(scores)


def test_arc_scores_equal_a_hand_computation(evaluation, tasks, model, tiny_tokenizer):
    hand = {}
    for name in ("arc_easy", "arc_challenge"):
        arc = tasks[name]
        acc, acc_norm = [], []
        for doc in arc.eval_docs:
            choices = arc.doc_to_choice(doc)
            ll = _hand_scores(model, tiny_tokenizer, arc.doc_to_text(doc), choices)
            acc.append(np.argmax(ll) == arc.doc_to_target(doc))
            acc_norm.append(np.argmax(ll / np.array([len(c) for c in choices])) == arc.doc_to_target(doc))
        hand[name] = np.mean(acc)
        assert evaluation["results"][name]["acc"] == pytest.approx(np.mean(acc))
        assert evaluation["results"][name]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert any(0.0 < a < 1.0 for a in hand.values())  # the comparison tells right from wrong predictions


def test_unknown_tasks_missing_files_and_shots_are_clear_errors(cache, tmp_path):
    with pytest.raises(ValueError, match="supported offline: piqa, arc_easy, arc_challenge"):
        prepare_offline_tasks(["mmlu"], DATA)
    (tmp_path / "piqa").mkdir()
    shutil.copy(DATA / "piqa/valid.jsonl", tmp_path / "piqa/valid.jsonl")
    with pytest.raises(ValueError, match=r"needs .*piqa/valid-labels\.lst, which does not exist"):
        prepare_offline_tasks(["piqa"], tmp_path)
    with pytest.raises(ValueError, match="num_fewshot=5"):
        evaluate_tasks(None, None, ["piqa"], DATA, num_fewshot=5)
    with pytest.MonkeyPatch.context() as mp:  # conftest keeps the hub offline
        mp.delenv("PRUNESEARCH_DATA_DIR", raising=False)
        with pytest.raises(ValueError, match="need a data_dir"):
            evaluate_tasks(None, None, ["piqa"])


def test_conversions_are_reused_until_a_source_changes(cache, tmp_path):
    data = shutil.copytree(DATA, tmp_path / "data")
    folder = prepare_offline_tasks(["hellaswag", "piqa", "boolq"], data)
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["hellaswag.jsonl", "piqa.jsonl"]  # boolq read in place
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_offline_tasks(["hellaswag", "piqa", "boolq"], data) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    labels = data / "piqa/valid-labels.lst"
    os.utime(labels, ns=(stamps["piqa.jsonl"] + 10**9,) * 2)
    prepare_offline_tasks(["piqa"], data)
    assert (folder / "piqa.jsonl").stat().st_mtime_ns > stamps["piqa.jsonl"]
    assert (folder / "hellaswag.jsonl").stat().st_mtime_ns == stamps["hellaswag.jsonl"]
    rows = (folder / "piqa.jsonl").read_text().splitlines()
    assert [json.loads(row)["label"] for row in rows] == [0, 1, 1, 1, 0, 1]


def test_offline_block_restores_the_environment_and_datasets_config(monkeypatch):
    import datasets

    from prunesearch.zeroshot import _offline

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with _offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["DISABLE_MULTIPROC"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    assert "DISABLE_MULTIPROC" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert datasets.config.HF_HUB_OFFLINE is False
