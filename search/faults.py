"""Every search ends: failed trials, the stop rule and the consecutive-failure stop.

A trial whose fitness is NaN or infinite, or that runs out of memory, is failed (Optuna state FAIL) with the
reason in its ``fail_reason`` user attribute instead of stopping the search; such failures count toward
``--trials`` like completed and pruned trials, and after :data:`MAX_CONSECUTIVE_FAILURES` of them in a row the
process stops its search with one line naming the cause. Trials failed by a crash (a killed worker, a stale
heartbeat) carry no reason and do not count: they are retried.

The stop rule is exact with several workers: a worker starts a trial only while the counted trials plus the
other workers' running ones are below ``--trials``; when only running trials stand between the study and its
count and the storage has heartbeats, it waits for them (failing stale ones, whose retries it then runs).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

import optuna
from optuna.trial import TrialState

log = logging.getLogger("prunesearch.search")

MAX_CONSECUTIVE_FAILURES = 5
FAIL_REASON = "fail_reason"
SKIPPED = "skipped"
_silenced: set[int] = set()  # trial numbers failed here on purpose: Optuna's own warning about them is dropped


class TrialFailed(Exception):
    """A trial that cannot produce a fitness (the reason is recorded, the search goes on)."""


class _DropOwnFailures(logging.Filter):
    pattern = re.compile(r"Trial (\d+) failed with")

    def filter(self, record: logging.LogRecord) -> bool:
        m = self.pattern.match(str(record.msg))
        return not (m and int(m.group(1)) in _silenced)


_filter = _DropOwnFailures()
if _filter not in logging.getLogger("optuna.study._optimize").filters:
    logging.getLogger("optuna.study._optimize").addFilter(_filter)


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e))


def guarded(objective, trial: optuna.Trial, multi: bool, rule: StopRule | None = None):
    """Run ``objective(trial)``; a non-finite fitness, an out-of-memory error or :class:`TrialFailed` fails the
    trial with its reason recorded (returns NaN, which Optuna stores as FAIL) instead of raising. The trial also
    records which worker (host:pid) ran it."""
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    if rule is not None and rule.surplus(trial):  # another worker took the last slot at the same moment
        trial.set_user_attr(SKIPPED, "the study reached its trial count before this trial started")
        _silenced.add(trial.number)
        return (math.nan, math.nan) if multi else math.nan  # FAIL without a reason: not counted, nothing measured
    try:
        value = objective(trial)
    except TrialFailed as e:
        reason = str(e)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        reason = f"out of memory: {(str(e).splitlines() or [''])[0][:200]}"
        _free_memory()
    else:
        values = value if isinstance(value, (tuple, list)) else (value,)
        bad = [v for v in values if v is None or not math.isfinite(v)]
        if not bad:
            return value
        reason = f"non-finite fitness ({bad[0]})"
    trial.set_user_attr(FAIL_REASON, reason)
    _silenced.add(trial.number)
    log.warning("trial %d failed: %s", trial.number, reason)
    return (math.nan, math.nan) if multi else math.nan


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def counted(trials) -> int:
    """Trials that count toward ``--trials``: completed, pruned, and failed with a recorded reason."""
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and FAIL_REASON in t.user_attrs))


def heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, retry) trials whose worker stopped sending heartbeats."""
    import warnings

    if heartbeat_enabled(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)


class StopRule:
    """When a worker stops: ``trials`` counted, the deadline, or a run of consecutive failed trials."""

    def __init__(self, trials: int | None, deadline: float | None, max_failures: int = MAX_CONSECUTIVE_FAILURES,
                 poll: float = 0.5):
        self.trials, self.deadline, self.max_failures, self.poll = trials, deadline, max_failures, poll
        self.consecutive = 0
        self.failure: str | None = None  # the one-line cause when the failures stopped the search

    def _counts(self, study: optuna.Study) -> tuple[int, int]:
        trials = study.get_trials(deepcopy=False)
        return counted(trials), sum(1 for t in trials if t.state == TrialState.RUNNING)

    def left(self, study: optuna.Study) -> int:
        """Trials this worker may still start (the others' running ones are spoken for)."""
        if self.trials is None:
            return 10**9
        done, running = self._counts(study)
        return max(0, self.trials - done - running)

    def surplus(self, trial: optuna.Trial) -> bool:
        """Whether a trial that has just started is beyond ``trials``: the trials numbered before it (counted,
        running or queued) fill the count already. Trial numbers are handed out by the storage, so of two workers
        that passed :meth:`reached` together exactly the later one sees it."""
        if self.trials is None:
            return False
        ahead = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
        return counted(ahead) + sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in ahead) >= self.trials

    def reached(self, study: optuna.Study) -> bool:
        """Whether to stop now (between trials); may wait for the other workers' last running trials."""
        while True:
            if self.failure is not None or (self.deadline is not None and time.time() >= self.deadline):
                return True
            if self.trials is None:
                return False
            done, running = self._counts(study)
            if done >= self.trials:
                return True
            if done + running < self.trials:
                return False
            if not heartbeat_enabled(study):
                return True  # no way to tell a dead worker's trial: its retry is left to a resumed run
            time.sleep(self.poll)
            fail_stale(study)

    def record(self, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and FAIL_REASON in trial.user_attrs:
            self.consecutive += 1
            if self.consecutive >= self.max_failures:
                self.failure = (f"search stopped: {self.consecutive} trials in a row failed "
                                f"(last, trial {trial.number}: {trial.user_attrs[FAIL_REASON]})")
                log.error(self.failure)
        elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self.consecutive = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each trial."""
        self.record(trial)
        if self.reached(study):
            study.stop()


def run_queued(study: optuna.Study, objective, rule: StopRule, after=None, fallback: int = 0) -> None:
    """Measure every queued trial (seeds, scan or chosen candidates), or ``fallback`` sampler trials when fewer are
    queued, within ``rule``; ``after(study, trial)`` runs after each (a progress bar)."""
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    n = min(max(waiting, fallback), rule.left(study))
    if n == 0 or rule.reached(study):
        return
    study.optimize(objective, n_trials=n, callbacks=[rule, *([after] if after else [])], gc_after_trial=False,
                   timeout=None if rule.deadline is None else max(1.0, rule.deadline - time.time()))


def stop_rule(ws, trials: int | None, deadline: float | None) -> StopRule:
    """The process's stop rule, kept on the workspace so that the plain and the guided loops share it."""
    rule = getattr(ws, "stop_rule", None)
    if rule is None or rule.trials != trials or rule.deadline != deadline:
        rule = StopRule(trials, deadline)
        ws.stop_rule = rule
    return rule
