"""The built-in default model: a small LLaMA trained here on the bundled C4 sample, so everything runs offline.

It is built once per seed into the prunesearch cache (a few minutes on two CPU cores) and then loaded like any
Hugging Face checkpoint. Training is fixed in optimizer steps, seeded and run with deterministic kernels, so the
same seed and step count give bit-identical weights on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunesearch.cache import cache_dir
from prunesearch.sources import C4_TRAIN_DOCS, bundled_c4_documents, bundled_wikitext2_test
from prunesearch.evaluate import perplexity
from prunesearch.safety import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent builds race, and the loser's copy is discarded
    fcntl = None

DEFAULT_SEED = 0
DEFAULT_SEQLEN = 256
NAME = "default-llama-v1"
EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
SHAPE = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 6, "num_attention_heads": 4,
         "num_key_value_heads": 2}
# Tuned on 2 CPU cores for the lowest C4 held-out PPL in a ~4 minute build (C4 docs 900-999, seqlen 256): at this
# budget more passes beat more width (d=256: 342 after ~570k tokens; d=192: 294; d=128: 203 after 1.15M tokens,
# ~6000 tokens/s), batch 4 beat 8 and 16 at equal tokens (more updates), and for d=128 lr 3e-3 beat 2e-3 (5e-3 tied).
BATCH_SIZE = 4
DEFAULT_STEPS = 1120  # 1120 x 4 x 256 = 1.15M tokens, about two passes over documents 0-899
PEAK_LR = 3e-3
MIN_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.1
QUICK_EVAL_WINDOWS = 8  # a build with non-default steps is a test build: its report scores only a few windows


def default_model_dir(seed: int = DEFAULT_SEED, steps: int | None = None) -> Path:
    """The cache folder of the default model for ``seed`` (a non-default ``steps`` gets its own folder)."""
    suffix = "" if steps is None or steps == DEFAULT_STEPS else f"-steps{steps}"
    return cache_dir("models", f"{NAME}-seed{seed}{suffix}")


def ensure_default_model(seed: int = DEFAULT_SEED, progress: bool = True, steps: int | None = None) -> Path:
    """The default model's folder, built first if absent; the build lands by atomic rename, never half-written."""
    if steps is not None and steps < 1:
        raise UserError(f"steps must be a positive number of optimizer steps, got {steps}")
    folder = default_model_dir(seed, steps)
    if (folder / "build_report.json").is_file():
        return folder
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        if fcntl is not None:  # a concurrent builder waits here, then finds the finished model
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "build_report.json").is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        try:
            _build(tmp, seed, steps or DEFAULT_STEPS, progress)
            try:
                tmp.rename(folder)  # replaces the empty placeholder that cache_dir creates
            except OSError:
                raise UserError(f"{folder} holds files but no build_report.json; delete that folder to "
                                f"rebuild the default model") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return folder


def load_default_model(seed: int = DEFAULT_SEED, progress: bool = True
                       ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) of the default model, building it first if needed."""
    folder = ensure_default_model(seed, progress)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB_SIZE`` entries; ``<|endoftext|>`` is bos, eos and unk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_max_length=DEFAULT_SEQLEN)


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """LLaMA architecture with grouped-query attention and untied embeddings, context ``DEFAULT_SEQLEN``."""
    eos = tokenizer.eos_token_id
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=DEFAULT_SEQLEN, tie_word_embeddings=False,
                       bos_token_id=eos, eos_token_id=eos, **SHAPE)


def pack(tokenizer: PreTrainedTokenizerFast, texts: list[str], seqlen: int) -> torch.Tensor:
    """Documents tokenized with eos after each, concatenated and cut into (n, seqlen) windows; remainder dropped."""
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seqlen
    return torch.tensor(stream[: n * seqlen], dtype=torch.long).view(n, seqlen)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to ``MIN_LR_FRACTION`` of the peak."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: LlamaForCausalLM, windows: torch.Tensor, steps: int, seed: int, progress: bool) -> dict:
    """AdamW on shuffled windows for exactly ``steps`` steps (reshuffled every pass); returns the loss curve."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="training default model", disable=not progress, unit="step")
    start = time.perf_counter()
    for step in bar:
        if order.numel() < BATCH_SIZE:
            order = torch.cat([order, torch.randperm(windows.shape[0], generator=generator)])
        batch, order = windows[order[:BATCH_SIZE]], order[BATCH_SIZE:]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}",
                        tok_s=f"{(step + 1) * batch.numel() / (time.perf_counter() - start):.0f}")
    model.eval()
    return {"first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.perf_counter() - start}


def _build(folder: Path, seed: int, steps: int, progress: bool) -> None:
    """Tokenizer, model, training, evaluation and save into ``folder`` (a fresh temporary folder)."""
    started = time.perf_counter()
    documents = bundled_c4_documents()
    train_docs = documents[C4_TRAIN_DOCS.start:C4_TRAIN_DOCS.stop]
    heldout_text = " ".join(documents[C4_TRAIN_DOCS.stop:])  # documents 900-999, never trained on
    tokenizer = train_tokenizer(train_docs)
    windows = pack(tokenizer, train_docs, DEFAULT_SEQLEN)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(model_config(tokenizer)).float()
            curve = train(model, windows, steps, seed, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    limit = None if steps == DEFAULT_STEPS else QUICK_EVAL_WINDOWS
    scores = {}
    for name, text in (("c4_heldout", heldout_text), ("wikitext2_test", bundled_wikitext2_test())):
        ids = torch.tensor([tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids])
        windows_scored = min(ids.numel() // DEFAULT_SEQLEN, limit or ids.numel())
        scores[name] = {"ppl": perplexity(model, ids, DEFAULT_SEQLEN, batch_size=16, limit=limit),
                        "windows": windows_scored, "seqlen": DEFAULT_SEQLEN}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    report = {
        "name": NAME, "seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "seqlen": DEFAULT_SEQLEN,
        "training_tokens": steps * BATCH_SIZE * DEFAULT_SEQLEN, "training_windows_available": windows.shape[0],
        "parameters": total, "parameters_in_decoder_blocks": blocks, "config": SHAPE | {"vocab_size": VOCAB_SIZE},
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "warmup_fraction": WARMUP_FRACTION,
                      "min_lr_fraction": MIN_LR_FRACTION, "weight_decay": WEIGHT_DECAY, "grad_clip": 1.0},
        "training": curve, "ppl": scores,
        "data": {"train": f"bundled C4 train shard 00000, documents {C4_TRAIN_DOCS.start}-{C4_TRAIN_DOCS.stop - 1}",
                 "c4_heldout": f"documents {C4_TRAIN_DOCS.stop}-{len(documents) - 1} joined with ' '",
                 "wikitext2_test": "bundled WikiText-2 raw test, rows joined with '\\n\\n'"},
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - started,
    }
    (folder / "build_report.json").write_text(json.dumps(report, indent=2))
    os.chmod(folder, 0o755)
