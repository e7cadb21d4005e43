"""Offline zero-shot tasks: documents parse as lm-eval builds them, and scores equal a hand computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transformers import AutoModelForCausalLM

from conftest import tiny_config
from prunesearch.zeroshot import SUPPORTED_OFFLINE, evaluate_tasks, hellaswag_preprocess, load_docs

DATA = Path(__file__).parent / "fixtures" / "shared_data"


@pytest.fixture(scope="module")
def results(tiny_tokenizer):
    config = tiny_config("llama")
    config.max_position_embeddings = 2048  # the tiny tokenizer spells long answers nearly byte by byte
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, evaluate_tasks(model, tiny_tokenizer, list(SUPPORTED_OFFLINE), DATA, batch_size=4, device="cpu")


def test_every_offline_task_runs_on_all_rows(results):
    _, out = results
    assert set(out["results"]) == set(SUPPORTED_OFFLINE)
    for task, r in out["results"].items():
        assert r["n"] == 6 and 0.0 <= r["acc"] <= 1.0, task
    assert out["results"]["lambada_openai"]["perplexity"] > 1.0
    assert out["protocol"]["source"].startswith("local:") and out["protocol"]["num_fewshot"] == 0


def test_documents_are_built_like_lm_eval():
    hs = load_docs("hellaswag", DATA)[0]
    assert hs.contexts == ["Roof shingle removal: A man is sitting on a roof. he"]
    assert hs.continuations[3] == " starts pulling up roofing on a roof." and hs.gold == 3
    assert hellaswag_preprocess("A [title] Do it [step]  now ") == "A. Do it  now"  # lm-eval's one-pass collapse
    piqa = load_docs("piqa", DATA)
    assert piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig cage")
    assert [d.gold for d in piqa] == [int(x) for x in (DATA / "piqa/valid-labels.lst").read_text().split()]
    wg = load_docs("winogrande", DATA)[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.continuations[0] == " always got the easier cases." and wg.gold == 1
    arc = load_docs("arc_challenge", DATA)[0]
    assert arc.gold == 2 and len(arc.continuations) == 4


def test_arc_easy_accuracy_equals_a_hand_computation(results, tiny_tokenizer):
    model, out = results
    correct = 0
    for doc in load_docs("arc_easy", DATA):
        ctx = tiny_tokenizer(doc.contexts[0], add_special_tokens=False)["input_ids"]
        scores = []
        for cont in doc.continuations:
            whole = tiny_tokenizer(doc.contexts[0] + cont, add_special_tokens=False)["input_ids"]
            cont_ids = whole[len(ctx):]
            ids = torch.tensor([ctx + cont_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont_ids)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc.gold)
    assert out["results"]["arc_easy"]["acc"] == pytest.approx(correct / 6)


def test_missing_files_and_unknown_tasks_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="piqa/valid.jsonl"):
        load_docs("piqa", tmp_path)
    with pytest.raises(ValueError, match="supported: piqa"):
        load_docs("mmlu", DATA)
