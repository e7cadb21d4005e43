"""Scaling and fault recovery of independent search workers on one study (journal file and PostgreSQL).

N separate ``prunesearch search`` commands (each its own ``--out``, one shared ``--cache-dir``, ``--predictor off``)
run one study of ``--trials`` trials on the tiny 4-block test LLaMA (tests/conftest.py), with a shared journal
file or a private PostgreSQL cluster on loopback (tests/pgserver.py). Measured per setting: trials per minute
(first trial start to last trial end, and including process start-up), duplicated work (allocations measured
twice, seeds measured twice), lost work (counted trials short of the target, trials left RUNNING), skipped
trial starts, and per-trial storage overhead (trial duration in the storage minus the objective's own wall time).
Then, on PostgreSQL, one of two workers is killed with SIGKILL in the middle of a trial: the time until the
heartbeat has failed that trial and a live worker has started and finished its retry.

    python benchmarks/workers.py [--trials 60] [--workers 1,2,4] [--samples 32] [--heartbeats 1,2]

Writes results/benchmarks/workers.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import TINY_TEXT, VOCAB, tiny_model  # noqa: E402
from pgserver import PostgresServer  # noqa: E402
from search.faults import counted  # noqa: E402
from search.samplers import allocation_key  # noqa: E402


def make_model(folder: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TINY_TEXT], trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model_dir = folder / "tiny-llama"
    tiny_model("llama", layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calib = folder / "calib.txt"
    calib.write_text(TINY_TEXT * 3)
    return model_dir, calib


def worker_argv(model: Path, calib: Path, out: Path, storage: str, study: str, trials: int, samples: int,
                cache: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "prunesearch", "search", "--model", str(model), "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "32", "--fitness-samples", str(samples), "--low-fidelity-samples",
            str(samples), "--min-sparsity", "0.3", "--max-sparsity", "0.9", "--device", "cpu",
            "--report-ppl=", "--quiet", "--predictor", "off", "--trials", str(trials), "--out", str(out),
            "--storage", storage, "--study", study, "--cache-dir", str(cache), *map(str, extra)]


def spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load(storage: str, study: str) -> optuna.Study:
    if "://" not in storage:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    return optuna.load_study(study_name=study, storage=storage)


def analyse(study: optuna.Study, trials: int, wall: float) -> dict:
    ts = study.trials
    done = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    measured = [t for t in done if "duplicate_of" not in t.user_attrs]
    keys = collections.Counter(allocation_key(t.user_attrs["allocation"]) for t in measured)
    seeds = collections.Counter(t.user_attrs["seed"] for t in measured if "seed" in t.user_attrs)
    start = min(t.datetime_start for t in done).timestamp()
    end = max(t.datetime_complete for t in done).timestamp()
    overhead = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["wall_s"] for t in done
                if "wall_s" in t.user_attrs]
    return {
        "counted": counted(ts), "target": trials, "complete": sum(t.state == TrialState.COMPLETE for t in ts),
        "pruned": sum(t.state == TrialState.PRUNED for t in ts), "lost": trials - counted(ts),
        "left_running": sum(t.state == TrialState.RUNNING for t in ts),
        "skipped": sum("skipped" in t.user_attrs for t in ts),
        "duplicate_reuses": sum("duplicate_of" in t.user_attrs for t in done),
        "measured_twice": sum(n - 1 for n in keys.values()), "seeds_measured_twice": sum(n - 1 for n in seeds.values()),
        "workers_seen": len({t.user_attrs.get("worker") for t in done}),
        "trials_per_min": 60 * len(done) / (end - start), "trials_per_min_with_startup": 60 * len(done) / wall,
        "median_trial_s": statistics.median(t.user_attrs["wall_s"] for t in done if "wall_s" in t.user_attrs),
        "storage_overhead_ms": 1000 * statistics.median(overhead), "wall_s": wall,
    }


def scaling(model, calib, work: Path, storage: str, label: str, n: int, trials: int, samples: int) -> dict:
    study = f"{label}-{n}"
    t = time.time()
    procs = [spawn(worker_argv(model, calib, work / f"{study}-w{i}", storage, study, trials, samples,
                               work / f"cache-{label}")) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
    row = analyse(load(storage, study), trials, time.time() - t)
    print(f"{label:<10} workers={n}: {row['trials_per_min']:.0f} trials/min, lost {row['lost']}, measured twice "
          f"{row['measured_twice']}, storage overhead {row['storage_overhead_ms']:.1f} ms", flush=True)
    return {"storage": label, "workers": n, "samples": samples, **row}


def kill_recovery(model, calib, work: Path, url: str, heartbeat: int, trials: int, samples: int, rep: int) -> dict:
    study = f"kill-hb{heartbeat}-{rep}"
    argv = [worker_argv(model, calib, work / f"{study}-w{i}", url, study, trials, samples, work / "cache-pg",
                        "--heartbeat", heartbeat) for i in range(2)]
    victim, survivor = spawn(argv[0]), spawn(argv[1])
    tag, number, killed_at = f":{victim.pid}", None, None
    try:
        deadline = time.time() + 300
        while number is None and time.time() < deadline and victim.poll() is None:
            try:
                mine = [t for t in load(url, study).trials if t.user_attrs.get("worker", "").endswith(tag)]
            except KeyError:
                mine = []
            if sum(t.state == TrialState.COMPLETE for t in mine) >= 2:
                running = [t.number for t in mine if t.state == TrialState.RUNNING]
                if running:
                    number = running[0]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.time()
            if number is None:
                time.sleep(0.02)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
    _, err = survivor.communicate(timeout=1800)
    if survivor.returncode != 0 or number is None:
        raise RuntimeError(f"kill run failed: {err[-3000:]}")
    s = load(url, study)
    retry = next(t for t in s.trials if t.system_attrs.get("failed_trial") == number)
    return {"heartbeat_s": heartbeat, "grace_s": max(2 * heartbeat, heartbeat + 2), "killed_trial": number,
            "killed_state": s.trials[number].state.name, "retry_trial": retry.number, "retry_state": retry.state.name,
            "kill_to_retry_start_s": retry.datetime_start.timestamp() - killed_at,
            "kill_to_retry_done_s": retry.datetime_complete.timestamp() - killed_at,
            "counted": counted(s.trials), "target": trials}


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = ["# Independent search workers on one study", "",
             f"{p['machine']}; tiny 4-block LLaMA (tests/conftest.py), {p['trials']} trials per study, "
             "`samples` held-out sequences × 32 tokens per trial (low fidelity = all of them, so every trial costs "
             "the same whether it is pruned or not), `--predictor off`, TPE, one "
             "thread per worker, each worker its own `--out` and one shared `--cache-dir`. Every worker is a "
             "separate `prunesearch search` command started at the same moment. Trials/min counts finished "
             "trials from the first trial's start to the last one's end (and, in brackets, over the whole wall "
             "time including process start-up and cache building). Storage overhead: median of a trial's "
             "duration in the storage minus the objective's own wall time. "
             f"Machine load while measuring: {p.get('load', 'n/a')}.", "",
             "| storage | samples | workers | trials/min | (with start-up) | counted / target | lost | left RUNNING | "
             "measured twice | seeds twice | skipped starts | duplicate reuses | storage overhead ms | "
             "median trial s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["scaling"]:
        lines.append(f"| {r['storage']} | {r['samples']} | {r['workers']} | {r['trials_per_min']:.0f} | "
                     f"{r['trials_per_min_with_startup']:.0f} | {r['counted']} / {r['target']} | {r['lost']} | "
                     f"{r['left_running']} | {r['measured_twice']} | {r['seeds_measured_twice']} | {r['skipped']} | "
                     f"{r['duplicate_reuses']} | {r['storage_overhead_ms']:.1f} | {r['median_trial_s']:.3f} |")
    lines += ["", "## kill -9 of one of two PostgreSQL workers in the middle of a trial", "",
              f"{p['kill_trials']} trials per study, {p['kill_samples']} held-out sequences per trial (about half a "
              "second each), the victim killed once it has finished 2 trials and is running a third. A live "
              "worker fails the silent trial once its heartbeat is older than the grace period (2 × the "
              "heartbeat interval, at least interval + 2 s) — it checks before each trial and while waiting "
              "for the study's last trials — and runs the re-queued copy.", "",
              "| heartbeat s | grace s | killed trial → state | retry trial → state | kill → retry starts s | "
              "kill → retry done s | counted / target |", "|---|---|---|---|---|---|---|"]
    for r in result["kill"]:
        lines.append(f"| {r['heartbeat_s']} | {r['grace_s']} | {r['killed_trial']} → {r['killed_state']} | "
                     f"{r['retry_trial']} → {r['retry_state']} | {r['kill_to_retry_start_s']:.1f} | "
                     f"{r['kill_to_retry_done_s']:.1f} | {r['counted']} / {r['target']} |")
    lines += ["", "A journal file has no heartbeat: a worker killed there leaves its trial RUNNING until a command "
              "that holds the run folder's lock resumes it (the run folder's own journal), so the kill test is "
              "PostgreSQL only.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--heartbeats", default="1,2")
    ap.add_argument("--kill-trials", type=int, default=12)
    ap.add_argument("--kill-samples", type=int, default=128)
    ap.add_argument("--out", default="results/benchmarks")
    ap.add_argument("--append", action="store_true", help="add these rows to an existing workers.json")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="prunesearch-workers-"))
    os.environ["PRUNESEARCH_CACHE"] = str(work / "cache")
    model, calib = make_model(work)
    result = {"protocol": {"trials": args.trials, "kill_trials": args.kill_trials,
                           "kill_samples": args.kill_samples,
                           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
                           "optuna": optuna.__version__},
              "scaling": [], "kill": []}
    if args.append:
        result = json.loads((Path(args.out) / "workers.json").read_text())
    counts = [int(n) for n in args.workers.split(",")]
    load_before = os.getloadavg()[0]
    with PostgresServer() as pg:
        for n in counts:
            result["scaling"].append(scaling(model, calib, work, str(work / f"journal-{n}.journal"), "journal", n,
                                             args.trials, args.samples))
            result["scaling"].append(scaling(model, calib, work, pg.url, "postgresql", n, args.trials,
                                             args.samples))
        for rep, hb in enumerate(int(h) for h in args.heartbeats.split(",") if h):
            row = kill_recovery(model, calib, work, pg.url, hb, args.kill_trials, args.kill_samples,
                                len(result["kill"]))
            print(f"kill -9 with heartbeat {hb}s: retry started {row['kill_to_retry_start_s']:.1f}s after the kill",
                  flush=True)
            result["kill"].append(row)
    result["protocol"]["load"] = (f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} "
                                  f"after, on {os.cpu_count()} cores (the workers themselves count)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "workers.json").write_text(json.dumps(result, indent=2))
    (out / "workers.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
