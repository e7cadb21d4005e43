"""Token data: the SparseGPT/Wanda drawing rule, every source (bundled, data folder, local file, hub), the id cache."""

from __future__ import annotations

import gzip
import json
import random
import socket

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prunesearch import data, sources
from prunesearch.safety import UserError

WORDS = ("pruning sparse weight layer model token search budget error sample window calibration held out "
         "document stream random seed quick brown fox lazy dog").split()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test writes its token cache under tmp_path, sees no data folder and no hub."""
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PRUNESEARCH_DATA_DIR", raising=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def contains(haystack: list[int], needle: torch.Tensor) -> bool:
    """Whether the token window ``needle`` occurs verbatim (contiguously) in ``haystack``."""
    hay = np.asarray(haystack, dtype=np.int32).tobytes()
    pos = hay.find(needle.numpy().astype(np.int32).tobytes())
    while pos != -1 and pos % 4:
        pos = hay.find(needle.numpy().astype(np.int32).tobytes(), pos + 1)
    return pos != -1


def reference_document_windows(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """SparseGPT's ``get_c4`` loop, written out independently of prunesearch."""
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            ids = encode(tokenizer, texts[i])
            if len(ids) > seqlen:
                break
        start = random.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start:start + seqlen])
    return torch.tensor(rows)


def synthetic_documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) for i in range(n)]


@pytest.fixture
def data_dir(tmp_path):
    """A tiny folder laid out like shared/data (C4 sample, WikiText-2 raw test with CRLF and validation, PTB)."""
    root = tmp_path / "data"
    c4 = root / "c4_sample/c4_en_train_first1000/c4_sample.jsonl"
    c4.parent.mkdir(parents=True)
    c4.write_text("".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in synthetic_documents(1000, 1)))
    wiki = root / "wikitext2_raw"
    (wiki / "rotorquant").mkdir(parents=True)
    (wiki / "voltagepark").mkdir()
    (wiki / "rotorquant/wikitext-test.txt").write_bytes(
        "\r\n\r\n".join([" = Title = ", ""] + synthetic_documents(40, 2)).encode())
    (wiki / "voltagepark/wikitext2_validation.txt").write_text("\n".join(synthetic_documents(40, 3)) + "\n")
    (root / "ptb").mkdir()
    (root / "ptb/ptb.test.txt").write_text("".join(f" {t} \n" for t in synthetic_documents(60, 4)))
    (root / "ptb/ptb.valid.txt").write_text("".join(f" {t} \n" for t in synthetic_documents(60, 5)))
    return root


def test_bundled_c4_calibration_follows_the_reference_rule(tiny_tokenizer):
    docs = sources.bundled_c4_documents()
    ids = data.calibration_ids(tiny_tokenizer, "c4", nsamples=6, seqlen=64, seed=3)
    assert ids.shape == (6, 64) and ids.dtype == torch.long
    assert torch.equal(ids, reference_document_windows(tiny_tokenizer, docs[:900], 6, 64, 3))
    assert torch.equal(ids, data.calibration_ids(tiny_tokenizer, "c4", 6, 64, seed=3))
    assert not torch.equal(ids, data.calibration_ids(tiny_tokenizer, "c4", 6, 64, seed=4))
    record = data.describe("c4", role="calibration")
    assert record["origin"] == "bundled" and record["split"].endswith("documents 0-899")


def test_heldout_windows_come_only_from_documents_900_to_949(tiny_tokenizer):
    docs = [encode(tiny_tokenizer, t) for t in sources.bundled_c4_documents()]
    held = data.heldout_ids(tiny_tokenizer, nsamples=8, seqlen=48, seed=0)
    calib = data.calibration_ids(tiny_tokenizer, "c4", nsamples=8, seqlen=48, seed=0)
    assert held.shape == (8, 48)
    for window in held:
        assert any(contains(d, window) for d in docs[900:950])
        assert not any(contains(d, window) for d in docs[:900] + docs[950:])  # never calibration nor report text
    for window in calib:
        assert any(contains(d, window) for d in docs[:900])
    assert "900-949" in data.describe("c4", role="heldout")["split"]


def test_bundled_evaluation_streams_are_the_reference_texts(tiny_tokenizer):
    wiki = data.eval_ids(tiny_tokenizer, "wikitext2")
    with gzip.open(sources.BUNDLED_WIKITEXT2_TEST, "rt", encoding="utf-8") as f:
        assert wiki.tolist() == [encode(tiny_tokenizer, f.read())]
    c4 = data.eval_ids(tiny_tokenizer, "c4")
    assert c4.tolist() == [encode(tiny_tokenizer, " ".join(sources.bundled_c4_documents()[950:]))]
    assert data.describe("c4")["evaluation"]["split"].endswith("documents 950-999")


def test_local_txt_is_one_stream_and_jsonl_is_documents(tiny_tokenizer, tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text(" ".join(synthetic_documents(30, 7)))
    stream = encode(tiny_tokenizer, txt.read_text())
    ids = data.calibration_ids(tiny_tokenizer, str(txt), nsamples=5, seqlen=32, seed=9)
    random.seed(9)  # the reference rule for a stream (SparseGPT get_wikitext2)
    starts = [random.randint(0, len(stream) - 32 - 1) for _ in range(5)]
    assert ids.tolist() == [stream[s:s + 32] for s in starts]
    assert data.eval_ids(tiny_tokenizer, str(txt)).tolist() == [stream]

    texts = synthetic_documents(50, 8)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    ids = data.calibration_ids(tiny_tokenizer, str(jsonl), nsamples=4, seqlen=16, seed=1)
    assert torch.equal(ids, reference_document_windows(tiny_tokenizer, texts, 4, 16, 1))
    assert data.eval_ids(tiny_tokenizer, str(jsonl)).tolist() == [encode(tiny_tokenizer, "\n\n".join(texts))]
    assert data.describe(str(jsonl), role="calibration")["origin"] == "file"


def test_data_folder_is_used_first(tiny_tokenizer, data_dir, monkeypatch):
    texts = synthetic_documents(1000, 1)
    ids = data.calibration_ids(tiny_tokenizer, "c4", 4, 24, seed=2, data_dir=data_dir)
    assert torch.equal(ids, reference_document_windows(tiny_tokenizer, texts[:900], 4, 24, 2))
    held = data.heldout_ids(tiny_tokenizer, 4, 24, seed=2, data_dir=data_dir)
    assert torch.equal(held, reference_document_windows(tiny_tokenizer, texts[900:950], 4, 24, 2))
    assert data.eval_ids(tiny_tokenizer, "c4", data_dir).tolist() == [encode(tiny_tokenizer, " ".join(texts[950:]))]

    crlf = (data_dir / "wikitext2_raw/rotorquant/wikitext-test.txt").read_bytes().decode()
    assert "\r\n" in crlf
    wiki = data.eval_ids(tiny_tokenizer, "wikitext2", data_dir)
    assert wiki.tolist() == [encode(tiny_tokenizer, crlf.replace("\r\n", "\n"))]
    ptb_lines = (data_dir / "ptb/ptb.test.txt").read_text().splitlines()
    ptb = data.eval_ids(tiny_tokenizer, "ptb", data_dir)
    assert ptb.tolist() == [encode(tiny_tokenizer, " ".join(line.strip() for line in ptb_lines))]
    valid = encode(tiny_tokenizer, " ".join(line.strip() for line in (data_dir / "ptb/ptb.valid.txt").read_text()
                                            .splitlines()))
    assert all(contains(valid, w) for w in data.calibration_ids(tiny_tokenizer, "ptb", 3, 20, data_dir=data_dir))

    monkeypatch.setenv("PRUNESEARCH_DATA_DIR", str(data_dir))
    record = data.describe("wikitext2")
    assert record["calibration"]["origin"] == record["evaluation"]["origin"] == "data_dir"
    assert record["calibration"]["file"].endswith("wikitext2_validation.txt")
    assert record["evaluation"]["file"].endswith("wikitext-test.txt")
    assert sources.resolve_data_dir(None) == data_dir
    assert sources.resolve_data_dir(data_dir / "c4_sample") == data_dir / "c4_sample"


def test_folder_without_a_file_falls_back_to_bundled(tiny_tokenizer, tmp_path):
    (tmp_path / "only_ptb/ptb").mkdir(parents=True)
    record = data.describe("c4", tmp_path / "only_ptb")
    assert record["calibration"]["origin"] == record["heldout"]["origin"] == "bundled"
    assert data.describe("wikitext2", tmp_path / "only_ptb", role="evaluation")["origin"] == "bundled"
    with pytest.raises(UserError, match="ptb/ptb.valid.txt"):
        data.calibration_ids(tiny_tokenizer, "ptb", 2, 8, data_dir=tmp_path / "only_ptb")


class FakeDataset:
    """What ``datasets.load_dataset`` returns, reduced to what prunesearch reads."""

    def __init__(self, column: str, rows: list[str]):
        self.column, self.rows = column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices) -> FakeDataset:
        return FakeDataset(self.column, [self.rows[i] for i in indices])

    def __getitem__(self, key: str) -> list[str]:
        assert key == self.column
        return self.rows


def test_hub_sources_follow_the_reference(tiny_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    validation = synthetic_documents(1200, 11)
    calls = []

    def load_dataset(name, config=None, split=None, data_files=None):
        calls.append((name, config, split, data_files))
        if name == "allenai/c4":
            assert data_files == {split: sources.HUB_C4[1][split]}
            return FakeDataset("text", validation if split == "validation" else synthetic_documents(50, 12))
        if name == "wikitext":
            return FakeDataset("text", ["a", "", "b"])
        return FakeDataset("sentence", ["x y", "z"])

    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ids = data.eval_ids(tiny_tokenizer, "c4")
    assert ids.tolist() == [encode(tiny_tokenizer, " ".join(validation[:1100]))]
    held = data.heldout_ids(tiny_tokenizer, 3, 16, seed=5)
    assert torch.equal(held, reference_document_windows(tiny_tokenizer, validation[1100:], 3, 16, 5))
    assert data.eval_ids(tiny_tokenizer, "wikitext2").tolist() == [encode(tiny_tokenizer, "a\n\n\n\nb")]
    assert data.eval_ids(tiny_tokenizer, "ptb").tolist() == [encode(tiny_tokenizer, "x y z")]
    assert ("wikitext", "wikitext-2-raw-v1", "test", None) in calls
    assert ("ptb_text_only", "penn_treebank", "test", None) in calls
    assert data.describe("c4", role="calibration")["data_files"] == "en/c4-train.00000-of-01024.json.gz"


def test_token_cache_is_reused_and_keyed_by_tokenizer_and_file(tiny_tokenizer, tmp_path, monkeypatch):
    txt = tmp_path / "t.txt"
    txt.write_text(" ".join(synthetic_documents(20, 13)))
    real = tiny_tokenizer.encode
    calls = []
    monkeypatch.setattr(tiny_tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = [data.eval_ids(tiny_tokenizer, "c4"), data.calibration_ids(tiny_tokenizer, "c4", 4, 32),
             data.heldout_ids(tiny_tokenizer, 4, 32), data.eval_ids(tiny_tokenizer, str(txt))]
    n = len(calls)
    assert n > 0
    second = [data.eval_ids(tiny_tokenizer, "c4"), data.calibration_ids(tiny_tokenizer, "c4", 4, 32),
              data.heldout_ids(tiny_tokenizer, 4, 32), data.eval_ids(tiny_tokenizer, str(txt))]
    assert len(calls) == n
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    files = list((tmp_path / "cache/tokens").iterdir())
    assert files and all(f.suffix == ".safetensors" for f in files)

    txt.write_text("changed text " * 50)
    assert data.eval_ids(tiny_tokenizer, str(txt)).tolist() == [real("changed text " * 50, add_special_tokens=False)]

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    other.train_from_iterator(WORDS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>")
    assert data.eval_ids(other, "c4").tolist() == [encode(other, " ".join(sources.bundled_c4_documents()[950:]))]


@pytest.mark.parametrize("call,error,message", [
    (lambda t: data.eval_ids(t, "wikitext3"), UserError, "unknown dataset 'wikitext3'; give c4, wikitext2, ptb"),
    (lambda t: data.eval_ids(t, "missing/file.txt"), UserError, "does not exist"),
    (lambda t: data.calibration_ids(t, "c4", 2, 64, data_dir="/no/such/folder"), UserError,
     "data folder /no/such/folder does not exist"),
    (lambda t: data.calibration_ids(t, "wikitext2", 2, 64), UserError, "--data-dir"),
    (lambda t: data.eval_ids(t, "ptb"), UserError, "no data folder was given"),
    (lambda t: data.heldout_ids(t, 2, 10 ** 6), UserError, "no document of c4 .* is longer than 1000000 tokens"),
    (lambda t: data.calibration_ids(t, "c4", 0, 64), UserError, "nsamples must be at least 1"),
    (lambda t: data.describe("c4", role="training"), ValueError, "role must be one of"),  # a caller's bug
])
def test_bad_input_is_a_clear_error(tiny_tokenizer, call, error, message):
    with pytest.raises(error, match=message) as raised:
        call(tiny_tokenizer)
    assert isinstance(raised.value, UserError) == (error is UserError)


def test_bad_local_files_are_clear_errors(tiny_tokenizer, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="too few for windows of 64"):
        data.calibration_ids(tiny_tokenizer, str(short), 2, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="line 2 has no string 'text' field"):
        data.eval_ids(tiny_tokenizer, str(bad))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"must end in \.txt .* or \.jsonl"):
        data.eval_ids(tiny_tokenizer, str(csv))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café ".encode("latin-1") * 50)
    with pytest.raises(UserError, match="latin1.txt cannot be read as UTF-8 text"):
        data.eval_ids(tiny_tokenizer, str(latin1))
    monkeypatch.setenv("PRUNESEARCH_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="absent does not exist"):
        data.describe("c4")


def test_hub_probe_is_skipped_offline_and_done_once(monkeypatch):
    probes = []

    def refuse(*args, **kwargs):
        probes.append(args)
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    sources._probe_hub.cache_clear()
    try:
        for flag in sources.OFFLINE_ENV:
            for other in sources.OFFLINE_ENV:
                monkeypatch.delenv(other, raising=False)
            monkeypatch.setenv(flag, "1")
            assert sources.hub_reachable() is False
        assert probes == []
        for other in sources.OFFLINE_ENV:
            monkeypatch.delenv(other, raising=False)
        assert sources.hub_reachable() is False and sources.hub_reachable() is False
        assert probes == [(("huggingface.co", 443),)]
    finally:
        sources._probe_hub.cache_clear()


def test_search_fitness_on_a_validation_split_never_the_test_split(tiny_tokenizer, data_dir, tmp_path):
    """--fitness-data wikitext2 / ptb: the windows come from the validation split (the test split is report data);
    without a validation file offline the refusal names the split."""
    for name, path, strip in (("wikitext2", "wikitext2_raw/voltagepark/wikitext2_validation.txt", False),
                              ("ptb", "ptb/ptb.valid.txt", True)):
        lines = (data_dir / path).read_text().splitlines()
        valid = encode(tiny_tokenizer, " ".join(line.strip() if strip else line for line in lines if line.strip()))
        held = data.heldout_ids(tiny_tokenizer, 5, 20, seed=3, data_dir=data_dir, source=name)
        assert held.shape == (5, 20) and all(contains(valid, w) for w in held)
        assert data.describe(name, data_dir, role="heldout")["split"] == "validation"
    with pytest.raises(UserError, match="no wikitext2 validation split"):
        data.heldout_ids(tiny_tokenizer, 2, 8, data_dir=tmp_path, source="wikitext2")


def test_a_heldout_mix_alternates_its_parts_and_a_longer_draw_extends_a_shorter_one(tiny_tokenizer, data_dir):
    """--fitness-data c4+wikitext2: windows alternate C4 / WikiText-2 validation, each part drawn as alone, so the
    early-stopping rung holds both and the selection's fresh windows (a longer draw's tail) never repeat fitness."""
    mix = data.heldout_ids(tiny_tokenizer, 7, 20, seed=3, data_dir=data_dir, source="c4+wikitext2")
    c4 = data.heldout_ids(tiny_tokenizer, 4, 20, seed=3, data_dir=data_dir, source="c4")
    wiki = data.heldout_ids(tiny_tokenizer, 3, 20, seed=3, data_dir=data_dir, source="wikitext2")
    assert mix.shape == (7, 20) and torch.equal(mix[0::2], c4) and torch.equal(mix[1::2], wiki)
    assert torch.equal(data.heldout_ids(tiny_tokenizer, 4, 20, seed=3, data_dir=data_dir, source="c4+wikitext2"),
                       mix[:4])
    assert not torch.equal(c4[:3], wiki)
    record = data.describe("c4+wikitext2", data_dir, role="heldout")
    assert record["mix"] == "c4+wikitext2" and [p["split"] for p in record["parts"]] == [
        "train shard 00000, documents 900-949", "validation"]
    for bad in ("c4+c4", "c4+wiki", "c4+"):
        with pytest.raises(UserError, match="a held-out mix joins distinct names of c4, wikitext2, ptb"):
            data.heldout_ids(tiny_tokenizer, 2, 8, data_dir=data_dir, source=bad)
