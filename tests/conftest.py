"""Shared fixtures: a tiny BPE tokenizer and tiny random models of every supported family, all built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Pruning removes weights that matter least; search decides where to prune. "
    "Sparse models keep accuracy when the right layers are spared. 0123456789 "
) * 20
VOCAB = 320


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed sentence set (deterministic, no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int = VOCAB, layers: int = 2):
    """Configs small enough for CPU tests yet with every structural feature of the family."""
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if family == "llama":  # GQA: 4 query heads share 2 key/value heads
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "opt":  # biases, ReLU, learned positions
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, **common)
    if family == "gpt2":  # Conv1D, fused c_attn
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, **common)
    if family == "gpt_neox":  # fused interleaved query_key_value, parallel residual, partial rotary
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=128, rotary_pct=0.25, **common)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "opt", "gpt2", "gpt_neox"]


def tiny_model(family: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers=layers))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 4-block tiny LLaMA with its tokenizer: what the search tests load by path."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama", layers=4).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_calib_file(tmp_path_factory):
    """A local calibration text file for the tiny tokenizer."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(TINY_TEXT * 3)
    return path


@pytest.fixture
def calib_file(tmp_path):
    """A local calibration text file for the tiny tokenizer, per test."""
    path = tmp_path / "calib.txt"
    path.write_text(TINY_TEXT * 3)
    return path


def saved_tiny_model(folder, tokenizer, family: str, layers: int = 2):
    """A tiny model of ``family`` saved with its tokenizer in ``folder``, as a user's checkpoint folder."""
    tiny_model(family, layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def finished_search(model_dir, calib_file, base, trials: int):
    """A finished search of ``trials`` trials on the tiny model (60% budget) in ``base/run``, caches in ``base``."""
    from search.engine import run_search

    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNESEARCH_CACHE", str(base / "cache"))
    try:
        run_search(search_settings(model_dir, calib_file), base / "run", trials=trials, report_ppl=(), progress=False)
    finally:
        mp.undo()
    return base / "run"


def search_settings(model_dir, calib_file, **kw):
    """Small, fast search settings on the tiny model (60% budget, bounds [0.3, 0.9]); ``kw`` overrides."""
    from search.engine import SearchSettings

    base = dict(model=str(model_dir), budget="sparsity=0.6", calib=str(calib_file), nsamples=4, seqlen=32,
                fitness_samples=6, low_fidelity_samples=2, min_sparsity=0.3, max_sparsity=0.9)
    base.update(kw)
    return SearchSettings(**base)


def interrupt_objective_at(monkeypatch, n: int):
    """Make the ``n``-th trial objective raise KeyboardInterrupt (a Ctrl-C mid-run); returns the original objective
    for the test to put back."""
    from search.engine import Workspace

    calls = {"n": 0}
    original = Workspace.objective

    def flaky(self, trial):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, trial)

    monkeypatch.setattr(Workspace, "objective", flaky)
    return original


def search_argv(model_dir, calib_file, out, *extra, trials: int = 6, samples: int = 6) -> list[str]:
    """``prunesearch search`` arguments for the tiny model (``samples`` held-out sequences per trial: 128 makes a
    trial last about half a second on one core, long enough to be killed in the middle). Wanda and GBLM rank from
    dense inputs here, cached once: the study mechanics these tests check do not depend on it; their default on a
    user's model, every candidate pruned for real, is checked in test_candidate_inputs.py and test_families.py."""
    from search.engine import default_stats_inputs

    extra = [str(e) for e in extra]
    pruner = extra[extra.index("--pruner") + 1] if "--pruner" in extra else "wanda"
    space = extra[extra.index("--space") + 1] if "--space" in extra else "sparsity"
    if "--stats-inputs" not in extra and default_stats_inputs(False, pruner, space):
        extra += ["--stats-inputs", "dense"]
    low = samples if samples > 6 else 2
    return ["search", "--model", str(model_dir), "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32",
            "--fitness-samples", str(samples), "--low-fidelity-samples", str(low), "--min-sparsity", "0.3",
            "--max-sparsity", "0.9", "--device", "cpu", "--report-ppl=", "--quiet", "--predictor", "off",
            "--trials", str(trials), "--out", str(out), *extra]


def tiny_width_model(layers: int = 4):
    """A tiny LLaMA with what width-space tests count with: (model, geometry, shapes, total parameters)."""
    from pruners.width.counting import shapes
    from pruners.width.geometry import geometry

    model = tiny_model("llama", layers=layers)
    geom = geometry(model)
    return model, geom, shapes(model, geom), sum(p.numel() for p in model.parameters())


def structured_search_argv(space: str, model_dir, calib_file, out, *extra, trials: int = 10) -> list[str]:
    """``prunesearch search --space width|both`` arguments for a tiny model (6 held-out sequences, 4 calibration)."""
    return ["search", "--space", space, "--model", str(model_dir), "--calib", str(calib_file), "--nsamples", "4",
            "--seqlen", "32", "--fitness-samples", "6", "--low-fidelity-samples", "2", "--device", "cpu",
            "--report-ppl=", "--quiet", "--trials", str(trials), "--out", str(out), *map(str, extra)]


def assert_refused(argv, message: str, out, capsys) -> None:
    """The CLI refuses ``argv`` with one line containing ``message``, exit 2, and writes no ``out``."""
    from prunesearch.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def cli_process(argv, cwd=None, **kw):
    """``python -m prunesearch ARGV`` as a separate process of this checkout (stdout/stderr piped)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "prunesearch", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def folder_hash(*paths) -> dict:
    """Every file under ``paths`` (name → sha256 of its bytes), to check that a command wrote or deleted nothing."""
    import hashlib
    from pathlib import Path

    digest = {}
    for root in map(Path, paths):
        if not root.exists():
            digest[str(root)] = None
            continue
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            digest[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return digest
