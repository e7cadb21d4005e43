"""Bad input, table-driven: every case exits with status 2 and exactly one line on stderr, and writes or deletes
nothing (every folder involved is hashed before and after). Checked before the model is loaded where possible."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import folder_hash, search_argv
from prunesearch.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir, tiny_calib_file):
    """Folders a user would have around: models (good, broken, NaN), a finished run, their own files."""
    root = tmp_path_factory.mktemp("world")
    broken = root / "broken-config"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    nan = root / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[1, 2] = math.inf
    model.save_pretrained(nan)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (nan / name).write_bytes((tiny_llama_dir / name).read_bytes())
    corrupt = root / "corrupt-weights"
    corrupt.mkdir()
    for f in tiny_llama_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    files = root / "user-files"  # files of the user's that no library can read
    files.mkdir()
    (files / "bad.yaml").write_text("sparsity: {0: 0.5\npattern: [")
    (files / "latin1.json").write_bytes('{"sparsity": {"0": 0.5}, "note": "café"}'.encode("latin-1"))
    (files / "latin1.txt").write_bytes("café au lait ".encode("latin-1") * 200)
    (files / "trials.parquet").write_bytes(b"not a parquet file")
    (files / "other_model.json").write_text('{"sparsity": {"7": 0.5, "transformer.h.0.mlp.c_fc": 0.6}}')
    (files / "predictor.json").write_text('{"format": ')
    (files / "record").mkdir()
    (files / "record" / "run_config.json").write_text('{"model": ')
    mine = root / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (root / "notes.txt").write_text("a file of the user's")
    damaged = root / "damaged-run"
    (root / "cwd").mkdir()
    (root / "cwd" / "data.csv").write_text("1,2,3")
    home = root / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1")
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNESEARCH_CACHE", str(root / "cache"))
        assert main(search_argv(tiny_llama_dir, tiny_calib_file, run, trials=5)) == 0
    damaged.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (damaged / f.name).write_bytes(f.read_bytes())
    lines = (damaged / "study.journal").read_bytes().split(b"\n")
    lines[3] = lines[3][: len(lines[3]) // 2]  # damaged in the middle: not repairable by truncation
    (damaged / "study.journal").write_bytes(b"\n".join(lines))
    return {"root": root, "model": tiny_llama_dir, "calib": tiny_calib_file, "broken": broken, "nan": nan,
            "mine": mine, "notes": root / "notes.txt", "run": run, "damaged": damaged, "home": home,
            "corrupt": corrupt, "files": files}


def _search(w, out, *extra, model=None):
    return search_argv(model or w["model"], w["calib"], out, *extra)


def _prune(w, out, *extra, model=None, calib=None):
    return ["prune", "--model", str(model or w["model"]), "--method", "wanda", "--sparsity", "0.5", "--calib",
            str(calib or w["calib"]), "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(out), *extra]


def _prune_config(w, config):
    return ["prune", "--model", str(w["model"]), "--method", "wanda", "--config", str(config), "--out",
            str(w["root"] / "new")]


# (case, argv builder, expected text in the one line)
CASES = [
    ("unknown storage scheme", lambda w: _search(w, w["root"] / "new", "--storage", "redis:mystudy"),
     "unknown scheme redis"),
    ("storage host:port without scheme", lambda w: _search(w, w["root"] / "new", "--storage", "localhost:5432/db"),
     "unknown scheme localhost"),
    ("storage name that is no journal file", lambda w: _search(w, w["root"] / "new", "--storage", "mystudy"),
     "ends in .journal"),
    ("storage is a folder", lambda w: _search(w, w["root"] / "new", "--storage", str(w["mine"]) + "/"),
     "is a folder"),
    ("storage file that is not a journal", lambda w: _search(w, w["root"] / "new", "--storage", str(w["notes"])),
     "not an Optuna journal"),
    ("sqlite in a missing folder", lambda w: _search(w, w["root"] / "new", "--storage", "sqlite:///nowhere/s.db"),
     "does not exist"),
    ("sqlite without a file", lambda w: _search(w, w["root"] / "new", "--storage", "sqlite://"),
     "sqlite://"),
    ("unreachable PostgreSQL", lambda w: _search(w, w["root"] / "new", "--storage",
                                                 "postgresql+psycopg2://postgres@127.0.0.1:1/nodb"),
     "cannot open storage postgresql+psycopg2://postgres@127.0.0.1:1/nodb"),
    ("N:M that does not divide the rows", lambda w: _search(w, w["root"] / "new", "--pattern", "2:3"),
     "not a multiple of 3"),
    ("N >= M", lambda w: _search(w, w["root"] / "new", "--pattern", "4:4"), "0 < N < M"),
    ("budget out of range", lambda w: _search(w, w["root"] / "new", "--budget", "sparsity=1.5"), "in [0, 1)"),
    ("budget not a number", lambda w: _search(w, w["root"] / "new", "--budget", "sparsity=0,7"), "not a number"),
    ("budget kind", lambda w: _search(w, w["root"] / "new", "--budget", "energy=3J"), "unknown budget kind"),
    ("width budget for sparsity", lambda w: _search(w, w["root"] / "new", "--budget", "latency=3ms"), "--space width"),
    ("statistics through pruned blocks for widths",
     lambda w: _search(w, w["root"] / "new", "--space", "width", "--budget", "params=80%", "--stats-inputs", "pruned"),
     "--stats-inputs apply to the sparsity"),
    ("candidate inputs for magnitude", lambda w: _search(w, w["root"] / "new", "--pruner", "magnitude",
                                                          "--stats-inputs", "candidate"),
     "needs a pruner that reads inputs"),
    ("candidate inputs for the SparseGPT database",
     lambda w: _search(w, w["root"] / "new", "--pruner", "sparsegpt", "--stats-inputs", "candidate"),
     "needs a pruner that reads inputs"),
    ("candidate calibration without candidate inputs",
     lambda w: _search(w, w["root"] / "new", "--stats-inputs", "dense", "--candidate-nsamples", "2"),
     "--candidate-nsamples applies to --stats-inputs candidate only"),
    ("candidate calibration beyond the calibration",
     lambda w: _search(w, w["root"] / "new", "--stats-inputs", "candidate", "--candidate-nsamples", "99"),
     "--candidate-nsamples must be in 1..--nsamples"),
    ("realize-top with candidate inputs",
     lambda w: _search(w, w["root"] / "new", "--stats-inputs", "candidate", "--realize-top", "2"),
     "every candidate is pruned for real already"),
    ("budget range with equal ends", lambda w: _search(w, w["root"] / "new", "--budget", "sparsity=0.6:0.6"),
     "equal ends"),
    ("negative params budget", lambda w: _search(w, w["root"] / "new", "--budget", "params=-5M"), "positive"),
    ("zero trials", lambda w: _search(w, w["root"] / "new", "--trials", "0"), "--trials must be at least 1"),
    ("zero workers", lambda w: _search(w, w["root"] / "new", "--workers", "0"), "--workers must be at least 1"),
    ("negative final selection", lambda w: _search(w, w["root"] / "new", "--select-top", "-1"),
     "--select-top must be at least 0"),
    ("final selection on no windows", lambda w: _search(w, w["root"] / "new", "--select-samples", "0"),
     "--select-samples must be at least 1"),
    ("final selection of a budget range", lambda w: _search(w, w["root"] / "new", "--budget", "sparsity=0.5:0.7",
                                                            "--select-top", "3"), "keeps its whole Pareto front"),
    ("start config that does not exist", lambda w: _search(w, w["root"] / "new", "--enqueue", w["root"] / "no.json"),
     "does not exist"),
    ("start config of another model", lambda w: _search(w, w["root"] / "new", "--enqueue",
                                                        w["files"] / "other_model.json"),
     "config names layers the model does not have"),
    ("start config that is not YAML", lambda w: _search(w, w["root"] / "new", "--enqueue", w["files"] / "bad.yaml"),
     "is not valid YAML"),
    ("start config for widths", lambda w: _search(w, w["root"] / "new", "--space", "width", "--budget", "params=80%",
                                                  "--enqueue", w["files"] / "other_model.json"),
     "--space width does not take one"),
    ("coarse to fine of widths", lambda w: _search(w, w["root"] / "new", "--granularity", "block,projection",
                                                   "--space", "width", "--budget", "params=80%"),
     "refines a sparsity allocation"),
    ("coarse to fine of a budget range", lambda w: _search(w, w["root"] / "new", "--granularity", "block,projection",
                                                           "--budget", "sparsity=0.5:0.7"), "give one budget"),
    ("coarse to fine into a one-stage run", lambda w: _search(w, w["run"], "--granularity", "block,projection"),
     "is a one-granularity search run"),
    ("coarse to fine into the user's folder", lambda w: _search(w, w["mine"], "--granularity", "block,projection"),
     "is not a prunesearch folder"),
    ("time budget", lambda w: _search(w, w["root"] / "new", "--time-budget", "5x"), "--time-budget"),
    ("broken config.json", lambda w: _search(w, w["root"] / "new", model=w["broken"]), "unreadable config.json"),
    ("missing model", lambda w: _search(w, w["root"] / "new", model=w["root"] / "nope"), "does not exist"),
    ("non-finite weight (search)", lambda w: _search(w, w["root"] / "new", model=w["nan"]),
     "model.layers.0.self_attn.q_proj.weight holds 0 NaN and 1 infinite"),
    ("non-finite weight (eval)", lambda w: ["eval", "--model", str(w["nan"]), "--ppl", str(w["calib"]),
                                            "--seqlen", "32", "--device", "cpu"], "non-finite weights"),
    ("search --out is a file", lambda w: _search(w, w["notes"]), "is not a folder"),
    ("search --out is the user's folder", lambda w: _search(w, w["mine"]), "not a prunesearch run folder"),
    ("search --out holds another study", lambda w: _search(w, w["run"], "--budget", "sparsity=0.5"),
     "different study"),
    ("journal damaged mid-file", lambda w: _search(w, w["damaged"]), "damaged at line 4"),
    ("predictor init that is no predictor", lambda w: _search(w, w["root"] / "new", "--predictor", "on",
                                                              "--predictor-init", str(w["mine"])),
     "not a predictor folder"),
    ("prune --overwrite of the user's folder", lambda w: _prune(w, w["mine"], "--overwrite"),
     "not written by prunesearch"),
    ("prune --overwrite of the current directory", lambda w: _prune(w, ".", "--overwrite"), "current directory"),
    ("prune --overwrite of a parent of it", lambda w: _prune(w, "..", "--overwrite"), "current directory"),
    ("prune --overwrite of home", lambda w: _prune(w, w["home"], "--overwrite"), "home directory"),
    ("prune onto an existing folder", lambda w: _prune(w, w["mine"]), "pass --overwrite"),
    ("prune --pattern N:M that does not fit", lambda w: ["prune", "--model", str(w["model"]), "--method", "wanda",
                                                       "--pattern", "2:3", "--out", str(w["root"] / "new")],
     "not a multiple of 3"),
    ("ast --overwrite of the user's folder", lambda w: ["ast", "--model", str(w["model"]), "--steps", "1", "--out",
                                                       str(w["mine"]), "--overwrite"], "not written by prunesearch"),
    ("predictor retrain --overwrite of the user's folder",
     lambda w: ["predictor", "retrain", "--from", str(w["run"]), "--out", str(w["mine"]), "--overwrite"],
     "not written by prunesearch"),
    # a library's error on a user's file, re-raised as one line naming the file
    ("corrupt weights file", lambda w: _prune(w, w["root"] / "new", model=w["corrupt"]),
     "its weights cannot be loaded"),
    ("config that is not valid YAML", lambda w: _prune_config(w, w["files"] / "bad.yaml"), "is not valid YAML"),
    ("config that is not UTF-8", lambda w: _prune_config(w, w["files"] / "latin1.json"), "cannot be read as text"),
    ("calibration text that is not UTF-8", lambda w: _prune(w, w["root"] / "new", calib=w["files"] / "latin1.txt"),
     "cannot be read as UTF-8 text"),
    ("run record that is not JSON", lambda w: _search(w, w["files"] / "record"),
     "run_config.json is not readable JSON"),
    ("trials table that is not parquet", lambda w: ["export", "--run", str(w["files"]), "--out",
                                                    str(w["root"] / "new.json")], "is not a readable parquet table"),
    ("predictor record that is not JSON", lambda w: ["predictor", "evaluate", "--predictor", str(w["files"]), "--on",
                                                     str(w["run"])], "predictor.json is not readable JSON"),
]


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, case, argv, expected, capsys, monkeypatch):
    cwd = world["root"] / "cwd"  # the user runs prunesearch inside a folder of theirs
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(world["home"]))
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(world["root"] / "cache"))
    args = [str(a) for a in argv(world)]
    watched = [world["root"] / name for name in ("cwd", "my-folder", "notes.txt", "run", "damaged", "home",
                                                 "broken-config", "nan-model", "corrupt-weights", "user-files")]
    before = folder_hash(*watched)
    listing = sorted(p.name for p in world["root"].iterdir())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunesearch: error:"), err
    assert expected in err[0], err[0]
    assert folder_hash(*watched) == before  # nothing written or deleted
    assert sorted(p.name for p in world["root"].iterdir()) == listing  # no new (empty) --out left behind


def test_overwrite_replaces_a_prunesearch_output(world, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune(world, out)) == 0
    marker = json.loads((out / ".prunesearch").read_text())
    assert marker["kind"] == "prune"
    (out / "stale.txt").write_text("from an earlier run")
    assert main(_prune(world, out, "--overwrite")) == 0
    assert not (out / "stale.txt").exists() and (out / "prune_report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary folder left beside it
