"""The block-drop scan: after the seeds, measure the best seed with each block in turn nearly removed, then with
the best few drops together, before the sampler or predictor takes over.

On SmolLM2-135M at 70% (Wanda ranks), dropping one block of ATP 0.3 to the top of its range changed the search KL
by −0.08 to +5.6 nats, and the good drops compound: blocks 14 and 15 together −0.13, blocks 5, 12, 14 and 15
−0.18 (``results/benchmarks/block_drops-smollm2-wanda-70.md``). A random drop among a search's children finds one
good block by luck and rarely a second; a scan of every block costs one trial per block and finds them all.
"""

from __future__ import annotations

import logging

import numpy as np
import optuna
from optuna.trial import TrialState

from search import faults, storage as storages
from search.samplers import SCAN, drop_blocks, param_name
from search.space import Space

log = logging.getLogger("prunesearch.search")
MAX_TOGETHER = 8  # at most this many of the best single drops are combined


def scan_applies(settings, space) -> bool:
    """Whether a run scans block drops: ``--drop-scan on``, or ``auto`` for a single-budget sparsity search that
    does not start from an ``--enqueue`` config (an earlier answer, which a scan of its own has refined already:
    the projection stage of coarse to fine starts from the block stage's)."""
    if settings.drop_scan == "off" or settings.space != "sparsity" or settings.multi_objective:
        return False
    return settings.drop_scan == "on" or not settings.enqueue


def scan_size(space: Space) -> int:
    """The most trials a scan measures: one per block, then the best 2 … ``MAX_TOGETHER`` drops together."""
    blocks = len(set(space.blocks))
    return blocks + max(0, min(blocks, MAX_TOGETHER) - 1)


def drop_scan(study: optuna.Study, ws, rule: faults.StopRule, storage: str | None = None,
              progress: bool = False) -> None:
    """Run (or resume) the scan on the best completed trial so far; skipped, with a log line, when it would take
    more than half the trials left after the queued seeds. Scan trials are measured in full and enter the study
    like any other."""
    from tqdm.auto import tqdm

    space = ws.space
    left = rule.left(study) - len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))  # after the seeds
    if rule.trials is not None and 2 * scan_size(space) > left and not _scanned(study):
        log.info("drop scan skipped: its %d trials would take more than half of the %d left", scan_size(space), left)
        return
    with tqdm(desc="drop scan", disable=not progress, dynamic_ncols=True) as bar:
        _scan(study, ws, rule, storage, lambda: _measure_waiting(study, ws, rule, bar))


def _scan(study: optuna.Study, ws, rule: faults.StopRule, storage: str | None, measure) -> None:
    space = ws.space
    measure()  # the seeds first: the scan starts from the best of them
    base = _base(study)
    if base is None:
        return
    alloc = np.asarray(base.user_attrs["allocation"], dtype=np.float64)
    blocks = sorted(set(int(b) for b in space.blocks))
    _enqueue(study, ws, {f"block-{b}": _drop(space, alloc, [b]) for b in blocks}, base, storage)
    measure()
    single = _results(study, "block-")
    gains = sorted((single[f"block-{b}"] - base.value, b) for b in blocks if f"block-{b}" in single)
    good = [b for gain, b in gains if gain < 0][:MAX_TOGETHER]
    together = {f"top-{k}": _drop(space, alloc, good[:k]) for k in range(2, len(good) + 1)}
    _enqueue(study, ws, together, base, storage)
    measure()
    log.info("drop scan from trial %d (%.4f): %d of %d single drops improve it (best: %s)", base.number, base.value,
             len(good), len(blocks), ", ".join(f"block {b} {g:+.4f}" for g, b in gains[:3]))


def _drop(space: Space, alloc: np.ndarray, blocks: list[int]) -> np.ndarray:
    """The sampled values of a drop: inside the bounds (the trial's allocation projects them onto the budget)."""
    return np.clip(drop_blocks(space, alloc, blocks, space.high), space.low, space.high)


def _scanned(study: optuna.Study) -> bool:
    return any(str(t.user_attrs.get("guide", "")).startswith(SCAN) for t in study.get_trials(deepcopy=False))


def _base(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial the scan starts from: the one recorded by an earlier (interrupted) scan, else the best so far."""
    trials = study.get_trials(deepcopy=False)
    recorded = {t.user_attrs.get("drop_base") for t in trials} - {None}
    done = [t for t in trials if t.state == TrialState.COMPLETE and "allocation" in t.user_attrs]
    if recorded:
        return next((t for t in done if t.number == min(recorded)), None)
    return min(done, key=lambda t: t.value, default=None)


def _enqueue(study: optuna.Study, ws, children: dict[str, np.ndarray], base, storage: str | None) -> None:
    """Queue the scan trials not yet queued or measured (under the study lock, as the seeds are)."""
    with storages.study_lock(study._storage, storage, ws.out, study.study_name):
        present = {t.user_attrs.get("guide") for t in study.get_trials(deepcopy=False)
                   if t.state != TrialState.FAIL or faults.FAIL_REASON in t.user_attrs}
        for name, x in children.items():
            label = f"{SCAN}/{name}"
            if label not in present:
                study.enqueue_trial({param_name(u): float(v) for u, v in zip(ws.space.units, x)},
                                    user_attrs={"guide": label, "drop_base": base.number})


def _results(study: optuna.Study, prefix: str) -> dict[str, float]:
    """Fitness of the completed scan trials whose name starts with ``prefix``."""
    head = f"{SCAN}/{prefix}"
    return {t.user_attrs["guide"][len(SCAN) + 1:]: t.value
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if str(t.user_attrs.get("guide", "")).startswith(head)}


def _measure_waiting(study: optuna.Study, ws, rule: faults.StopRule, bar) -> None:
    """Measure the queued trials, within the run's stop rule, counting them on the scan's bar."""
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    bar.total = (bar.total or 0) + min(waiting, rule.left(study))
    faults.run_queued(study, ws.objective, rule, lambda *_: bar.update())
