"""Several independent worker commands on one study in a real PostgreSQL server (started by the test on loopback):
the study reaches exactly its trial count, seeds are measured once, no allocation twice, caches are built once,
and a worker killed mid-trial has its trial failed by the heartbeat and retried by another."""

from __future__ import annotations

import collections
import os
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import cli_process, search_argv
from pgserver import PostgresServer, find_bin
from search.faults import counted
from search.samplers import allocation_key

SEEDS = {"uniform", "owl", "atp-0.1", "atp-0.2", "atp-0.3", "atp-0.4", "atp-0.5"}


@pytest.fixture(scope="module")
def postgres():
    if find_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install -e .[dev]")
    with PostgresServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def _study(url: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def _finish(procs, timeout: float = 300.0) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        results.append((p.returncode, err))
    return results


def test_three_worker_commands_share_one_study_exactly(postgres, tiny_llama_dir, tiny_calib_file, tmp_path):
    trials = 30
    procs = [cli_process(search_argv(tiny_llama_dir, tiny_calib_file, tmp_path / f"worker{i}", "--storage",
                                     postgres.url, "--study", "three", "--cache-dir", tmp_path / "shared-cache",
                                     trials=trials, samples=64)) for i in range(3)]
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    study = _study(postgres.url, "three")
    states = collections.Counter(t.state for t in study.trials)
    assert counted(study.trials) == trials  # exactly the asked number, none lost, none extra
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == trials and states[TrialState.RUNNING] == 0
    # A trial started by two workers at the same moment as the last one is skipped before measuring anything.
    assert all("skipped" in t.user_attrs for t in study.trials if t.state == TrialState.FAIL)
    measured = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and "duplicate_of" not in t.user_attrs]
    keys = [allocation_key(t.user_attrs["allocation"]) for t in measured]
    assert len(keys) == len(set(keys))  # no allocation measured twice
    seeds = collections.Counter(t.user_attrs["seed"] for t in study.trials if "seed" in t.user_attrs)
    assert seeds == {s: 1 for s in SEEDS}  # enqueued once per study, not once per worker
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2
    # The expensive caches were computed by one worker and loaded by the others.
    logs = [(tmp_path / f"worker{i}" / "search.log").read_text() for i in range(3)]
    assert sum("ranked all weights" in text for text in logs) == 1
    assert len(list((tmp_path / "shared-cache").glob("scores-*.safetensors"))) == 1


def _trials_of(url: str, tag: str) -> list:
    """The trials of study ``killed`` run by the worker whose name ends with ``tag`` (none before it exists)."""
    try:
        return [t for t in _study(url, "killed").trials if t.user_attrs.get("worker", "").endswith(tag)]
    except KeyError:  # the study is not created yet
        return []


def test_a_worker_killed_mid_trial_is_failed_by_the_heartbeat_and_retried(postgres, tiny_llama_dir, tiny_calib_file,
                                                                          tmp_path):
    trials = 16
    argv = [search_argv(tiny_llama_dir, tiny_calib_file, tmp_path / f"worker{i}", "--storage", postgres.url,
                        "--study", "killed", "--heartbeat", 1, "--cache-dir", tmp_path / "shared-cache",
                        trials=trials, samples=128) for i in range(2)]
    victim = cli_process(argv[0])
    tag = f":{victim.pid}"
    deadline = time.time() + 180
    # the survivor starts once the victim measures trials: started together on a loaded machine, the survivor could
    # take all but two of the trials and leave the victim nothing to be killed in (seen once in a full suite run)
    while time.time() < deadline and victim.poll() is None and not any(
            t.state == TrialState.COMPLETE for t in _trials_of(postgres.url, tag)):
        time.sleep(0.05)
    survivor = cli_process(argv[1])
    try:
        number = None
        while number is None and time.time() < deadline and victim.poll() is None:
            mine = _trials_of(postgres.url, tag)
            if sum(t.state == TrialState.COMPLETE for t in mine) >= 2:
                running = [t.number for t in mine if t.state == TrialState.RUNNING]
                number = running[0] if running else None
            if number is None:
                time.sleep(0.05)
        assert number is not None, "the victim never ran a trial"
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        victim.wait(timeout=30)
        # the trial the kill interrupted (the one seen running may have finished just before the signal)
        running = [t.number for t in _study(postgres.url, "killed").trials
                   if t.user_attrs.get("worker", "").endswith(tag) and t.state == TrialState.RUNNING]
        assert len(running) <= 1  # none when the signal landed in the instant between two trials
    finally:
        if victim.poll() is None:
            victim.kill()
    code, err = _finish([survivor])[0]
    victim.communicate()
    assert code == 0, err[-3000:]
    study = _study(postgres.url, "killed")
    for number in running:
        killed = study.trials[number]
        assert killed.state == TrialState.FAIL and "fail_reason" not in killed.user_attrs
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
        assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
        # the retry keeps what the killed trial had drawn (all of it, or the units drawn before the kill landed)
        assert killed.params.items() <= retries[0].params.items()
        assert retries[0].user_attrs["worker"].endswith(f":{survivor.pid}")
        assert retries[0].datetime_complete.timestamp() - killed_at < 60
    assert counted(study.trials) == trials  # the study still reaches its count
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
