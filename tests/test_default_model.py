"""The built-in default model: deterministic quick builds, atomic landing in the cache, and the real build's quality."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunesearch import data
from prunesearch import default_model as dm
from prunesearch.evaluate import perplexity
from prunesearch.safety import UserError

QUICK_STEPS = 3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private prunesearch cache, so quick builds never touch the user's."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_quick_builds_are_bit_identical_and_load_back(tmp_path, monkeypatch):
    folders = []
    for name in ("a", "b"):
        monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / name))
        folders.append(dm.ensure_default_model(seed=0, progress=False, steps=QUICK_STEPS))
    a, b = folders
    assert a.name == b.name == f"default-llama-v1-seed0-steps{QUICK_STEPS}"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()

    report = json.loads((a / "build_report.json").read_text())
    assert report["steps"] == QUICK_STEPS and report["seed"] == 0
    assert report["training_tokens"] == QUICK_STEPS * dm.BATCH_SIZE * dm.DEFAULT_SEQLEN
    assert report["training"]["final_loss"] < report["training"]["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(a, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(a, local_files_only=True)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "llama" and model.config.num_hidden_layers >= 6
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert not model.config.tie_word_embeddings and model.config.max_position_embeddings == dm.DEFAULT_SEQLEN
    assert len(tokenizer) == dm.VOCAB_SIZE
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    text = "Pruning keeps the weights that matter. Ünïcode too!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), dm.VOCAB_SIZE) and torch.isfinite(logits).all()
    c4 = report["ppl"]["c4_heldout"]
    assert c4["windows"] == dm.QUICK_EVAL_WINDOWS and 1 < c4["ppl"] < 2 * dm.VOCAB_SIZE


def test_a_built_model_is_reused_and_steps_pick_the_folder(cache, monkeypatch):
    assert dm.default_model_dir().name == "default-llama-v1-seed0"
    assert dm.default_model_dir(seed=2, steps=dm.DEFAULT_STEPS) == dm.default_model_dir(seed=2)
    assert dm.default_model_dir(steps=5).name == "default-llama-v1-seed0-steps5"
    assert dm.default_model_dir().parent == cache / "models"
    folder = dm.default_model_dir(steps=QUICK_STEPS)
    (folder / "build_report.json").write_text("{}")

    def no_build(*args):
        raise AssertionError("a model with a build report must not be rebuilt")

    monkeypatch.setattr(dm, "_build", no_build)
    assert dm.ensure_default_model(progress=False, steps=QUICK_STEPS) == folder
    with pytest.raises(ValueError, match="steps must be a positive number"):
        dm.ensure_default_model(steps=0)


def test_an_interrupted_build_leaves_nothing_behind(cache, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.ensure_default_model(progress=False, steps=QUICK_STEPS)
    assert _entries(cache) == [f"default-llama-v1-seed0-steps{QUICK_STEPS}"]  # the empty placeholder, no temporary
    assert not any(dm.default_model_dir(steps=QUICK_STEPS).iterdir())


def _entries(cache) -> list[str]:
    """What the model cache holds, besides the build lock files."""
    return sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock"))


def test_a_concurrent_builder_waits_for_the_first_and_uses_its_model(cache, monkeypatch):
    import threading

    folder = dm.default_model_dir(steps=QUICK_STEPS)
    started, release, builds = threading.Event(), threading.Event(), []

    def slow_build(tmp, seed, steps, progress):
        builds.append(tmp)
        started.set()
        release.wait(10)
        (tmp / "build_report.json").write_text('{"builder": %d}' % len(builds))

    monkeypatch.setattr(dm, "_build", slow_build)
    results = []
    first = threading.Thread(target=lambda: results.append(dm.ensure_default_model(progress=False, steps=QUICK_STEPS)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(dm.ensure_default_model(progress=False, steps=QUICK_STEPS)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked on the build lock, not building a second copy
    release.set()
    first.join(10)
    second.join(10)
    assert results == [folder, folder] and len(builds) == 1
    assert json.loads((folder / "build_report.json").read_text()) == {"builder": 1}
    assert _entries(cache) == [folder.name]


def test_a_foreign_folder_is_never_overwritten(cache, monkeypatch):
    folder = dm.default_model_dir(steps=QUICK_STEPS)
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setattr(dm, "_build", lambda tmp, *args: (tmp / "build_report.json").write_text("{}"))
    with pytest.raises(UserError, match="no build_report.json; delete that folder"):
        dm.ensure_default_model(progress=False, steps=QUICK_STEPS)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert _entries(cache) == [folder.name]


@pytest.mark.slow
def test_the_real_default_model_is_trained(monkeypatch):
    """Builds (or reuses) the real default model in the user cache and checks its measured quality."""
    monkeypatch.delenv("PRUNESEARCH_CACHE", raising=False)
    monkeypatch.delenv("PRUNESEARCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = dm.ensure_default_model()
    report = json.loads((folder / "build_report.json").read_text())
    assert report["steps"] == dm.DEFAULT_STEPS and report["config"]["num_hidden_layers"] >= 6
    # Measured here: C4 held-out PPL 202.7, WikiText-2 386.9. Count-based baselines on the same tokens give 1086
    # (unigram) and 266 (bigram) on C4, so the bound demands a model that learned more than bigram statistics.
    assert report["ppl"]["c4_heldout"]["ppl"] < 250
    assert report["ppl"]["wikitext2_test"]["ppl"] < 500
    model, tokenizer = dm.load_default_model(progress=False)
    ids = data.eval_ids(tokenizer, "wikitext2")  # offline: the bundled test split, as in the report
    assert perplexity(model, ids, dm.DEFAULT_SEQLEN, batch_size=16) == pytest.approx(
        report["ppl"]["wikitext2_test"]["ppl"], rel=1e-4)
