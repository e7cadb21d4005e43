"""Faults on a single machine: NaN fitness and non-finite weights, a killed run, a truncated journal, a corrupt
cache and a second command on a live run folder. Real processes, real files, real Optuna; nothing mocked."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import cli_process, search_argv
from prunesearch.cli import main
from search.faults import FAIL_REASON, StopRule, counted, guarded


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def _variant(src, dst, edit):
    """A copy of the tiny model with ``edit(model)`` applied to its weights."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _journal(path) -> optuna.Study:
    """The study as Optuna alone reads the journal file."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name="prunesearch", storage=storage)


def test_failed_trials_count_toward_the_stop_rule_and_a_run_of_them_stops_the_search():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    values = iter([1.0, math.nan, 2.0, math.inf, 3.0, 4.0, 5.0, 6.0])
    rule = StopRule(trials=6, deadline=None)
    study.optimize(lambda t: guarded(lambda t: next(values), t, False), callbacks=[rule])
    assert counted(study.trials) == 6 == len(study.trials)  # the two failed trials counted
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.user_attrs[FAIL_REASON] for t in failed] == ["non-finite fitness (nan)", "non-finite fitness (inf)"]

    def oom(trial):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    study = optuna.create_study()
    rule = StopRule(trials=100, deadline=None)
    study.optimize(lambda t: guarded(oom, t, False), callbacks=[rule])
    assert len(study.trials) == 5 and rule.failure.startswith("search stopped: 5 trials in a row failed")
    assert "out of memory" in rule.failure

    def bug(trial):
        raise KeyError("an internal bug")

    with pytest.raises(KeyError):  # a bug is not disguised as a failed trial
        optuna.create_study().optimize(lambda t: guarded(bug, t, False), n_trials=3)


def test_nan_fitness_ends_the_search_with_one_line(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    # Finite weights whose logits overflow to inf in float32 (what fp16 overflow does to a large model).
    model = _variant(tiny_llama_dir, tmp_path / "overflow",
                     lambda m: m.lm_head.weight.copy_(torch.sign(m.lm_head.weight) * 3e38))
    out = tmp_path / "run"
    argv = search_argv(model, tiny_calib_file, out, trials=50)
    argv[argv.index("--predictor") + 1] = "on"  # the guided loop (the default) ends as well
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5 trials in a row failed" in err[0] and "non-finite fitness (nan)" in err[0]
    frame = pd.read_parquet(out / "trials.parquet")
    failed = frame[frame.state == "FAIL"]
    assert len(failed) == 5 and (failed.fail_reason == "non-finite fitness (nan)").all()
    assert len(_journal(out / "study.journal").trials) == len(frame)


def test_non_finite_weights_are_refused_by_every_command(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    model = _variant(tiny_llama_dir, tmp_path / "nan", lambda m: m.model.layers[1].mlp.down_proj.weight.
                     __setitem__((0, 3), math.nan))
    out = tmp_path / "out"
    capsys.readouterr()
    common = ["--model", str(model), "--device", "cpu", "--seqlen", "32"]
    calib = ["--calib", str(tiny_calib_file), "--nsamples", "4"]
    for argv in (["prune", *common, *calib, "--method", "sparsegpt", "--sparsity", "0.5", "--out", out],
                 ["prune", *common, *calib, "--method", "wanda", "--sparsity", "0.5", "--out", out],
                 ["eval", *common, "--ppl", str(tiny_calib_file)],
                 search_argv(model, tiny_calib_file, out),
                 ["ast", *common, *calib, "--steps", "2", "--out", out]):
        assert main(list(map(str, argv))) == 2, argv[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.layers.1.mlp.down_proj.weight holds 1 NaN" in err[0], err
        assert not out.exists()


def test_a_truncated_journal_is_repaired_and_resumed_keeping_every_trial(tiny_llama_dir, tiny_calib_file,
                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, trials=8)) == 0  # the 7 seeds and one sampled trial
    journal = out / "study.journal"
    before = _journal(journal).trials
    with open(journal, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"op_code": 6, "worker_id": "abc", "trial_id": 9, "user_attr": {"alloc')
    assert len(_journal(journal).trials) == 8  # Optuna alone still reads it...
    capsys.readouterr()
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, trials=11)) == 0  # ...and so does a resume
    assert "removed a partial last line" in capsys.readouterr().err
    after = _journal(journal).trials  # still readable by Optuna after appending
    assert counted(after) == 11
    assert [(t.state, t.values) for t in after[:8]] == [(t.state, t.values) for t in before]


def test_a_corrupt_cache_is_recomputed(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, trials=5)) == 0
    caches = sorted((out / "cache").glob("*.safetensors"))
    assert {p.name.split("-")[0] for p in caches} == {"scores", "reference", "selection"}
    (out / "selection.json").unlink()  # so that the final selection measures (and reads its reference) again
    intact = {p: p.read_bytes() for p in caches}
    tensors = {p: {k: v.clone() for k, v in load_file(str(p)).items()} for p in caches}  # (load_file maps the file)
    for p in caches:
        p.write_bytes(intact[p][: len(intact[p]) // 2])  # truncated by a crash
    token_caches = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    for p in token_caches:
        p.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, trials=7)) == 0
    err = capsys.readouterr().err
    assert err.count("is unreadable") == len(caches) + len(token_caches)
    for p in caches:  # recomputed (to float noise: another test may have changed torch's thread count)
        again = load_file(str(p))
        assert again.keys() == tensors[p].keys()
        for k, v in again.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, tensors[p][k], rtol=1e-4, atol=1e-5)
            else:
                assert v.shape == tensors[p][k].shape and (v == tensors[p][k]).float().mean() > 0.99
    assert (pd.read_parquet(out / "trials.parquet").state == "COMPLETE").sum() >= 5


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    start = time.time()
    while time.time() - start < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial(journal, pid: int):
    """The number of a trial that process ``pid`` is running, once it has completed at least 3."""
    if not journal.exists():
        return None
    try:
        trials = _journal(journal).trials
    except (KeyError, ValueError):  # the study is not created yet
        return None
    mine = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{pid}")]
    if sum(t.state == TrialState.COMPLETE for t in mine) < 3:
        return None
    running = [t.number for t in mine if t.state == TrialState.RUNNING]
    return running[0] if running else None


def test_a_live_run_folder_is_refused_and_a_killed_run_resumes(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = search_argv(tiny_llama_dir, tiny_calib_file, out, trials=30, samples=128)
    first = cli_process(argv)
    try:
        _wait_for(lambda: _running_trial(out / "study.journal", first.pid), what="a running trial")
        # A second command on the live folder is refused in one line and touches nothing of the live run.
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by a running prunesearch command" in err[0]
        assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                     "--out", str(out), "--overwrite"]) == 2
        assert "a running prunesearch command is using it" in capsys.readouterr().err
        os.kill(first.pid, signal.SIGKILL)  # kill -9 in the middle of a trial
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    before = _journal(out / "study.journal").trials
    # the trial the kill interrupted: usually one; none when the signal landed in the instant between two trials
    # (the one seen running may have finished just before it)
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(running) <= 1
    finished = {t.number: t.values for t in before if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    queued = sum(t.state == TrialState.WAITING for t in before)  # seeds not measured yet run before the retry
    resumed = search_argv(tiny_llama_dir, tiny_calib_file, out, trials=len(finished) + queued + 3, samples=128)
    assert main(resumed) == 0  # the lock is free now: the dead run's RUNNING trial is failed and re-queued
    after = _journal(out / "study.journal").trials
    assert {n: after[n].values for n in finished} == finished  # nothing lost, nothing redone
    for number in running:
        assert after[number].state == TrialState.FAIL
        # retried with what it had drawn (all of it, or the units drawn before the kill landed)
        drawn = before[number].params.items()
        retried = [t for t in after if t.number > number and drawn <= t.params.items()]
        assert retried and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert counted(after) == len(finished) + queued + 3
    assert json.loads((out / "report.json").read_text())["best"] is not None


def test_independent_commands_on_one_shared_journal_reach_the_count_exactly(tiny_llama_dir, tiny_calib_file,
                                                                           tmp_path):
    journal = tmp_path / "shared.journal"
    procs = [cli_process(search_argv(tiny_llama_dir, tiny_calib_file, tmp_path / f"w{i}", "--storage", journal,
                                     "--cache-dir", tmp_path / "cache-shared", trials=16)) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="prunesearch", storage=storage).trials
    assert counted(trials) == 16 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert all("skipped" in t.user_attrs for t in trials if t.state == TrialState.FAIL)
    seeds = [t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs]
    # enqueued once
    assert sorted(seeds) == sorted({"uniform", "owl", "atp-0.1", "atp-0.2", "atp-0.3", "atp-0.4", "atp-0.5"})
