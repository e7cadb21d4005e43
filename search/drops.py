"""The block-drop scan: after the seeds, measure the best seed with each run of adjacent blocks in turn nearly
removed, then the best few runs together, before the sampler or predictor takes over.

On SmolLM2-135M at 70% (Wanda ranks), dropping one block of ATP 0.3 to the top of its range changed the search KL
by −0.08 to +5.6 nats, and the good drops compound: blocks 14 and 15 together −0.13, blocks 5, 12, 14 and 15
−0.18 (``results/benchmarks/block_drops-smollm2-wanda-70.md``). A random drop among a search's children finds one
good block by luck and rarely a second; a scan costs one trial per unit and finds them all. Its units are runs of
adjacent blocks on deep models: the good sets there are runs (blocks 3–5 and 13–15), and a block of a run can gain
nothing alone and 0.07 nats once its neighbours are gone, so single drops combined in order of gain land in
another basin of drop sets (``results/benchmarks/drop_sets-smollm2-wanda-70.md``). After runs, the best drop set
is measured once more under a small grid of profiles of the blocks it keeps: the base's profile was shaped for
the whole depth, and with a fifth of the blocks dropped a flatter rise and a protected first run read 0.05–0.07
nats better on all three seeds measured there.

A drop counts only when its gain clears the noise of the fitness sample: more than ``NOISE_Z`` standard errors of the
paired per-sequence differences to the base (``clears_noise``). At 60% the best unit gained 0.017 nats on 16
sequences, within that noise, read 0.018 nats worse on 32 fresh ones, and combined with profiles it led the search
into a basin that lost to ATP 0.2 on WikiText-2 (``results/benchmarks/search_quality-smollm2-60-candidate.md``).
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
BEST_RUNS = 4  # runs of several blocks: every non-overlapping pair of the best this many is measured
PROFILE_SLOPES = (0.1, 0.2, 0.3)  # kept blocks' rise in sparsity from first to last block (ATP's slope)
PROFILE_PROTECT = (0.0, 0.06, 0.12)  # how much less the first run of blocks is pruned than the slope says
NOISE_Z = 2.0  # a drop is kept only when it gains this many standard errors of the paired per-sequence differences


def scan_applies(settings, space) -> bool:
    """Whether a run scans block drops: ``--drop-scan on``, or ``auto`` for a single-budget sparsity search that
    does not start from an ``--enqueue`` config (an earlier answer, which a scan of its own has refined already:
    the projection stage of coarse to fine starts from the block stage's)."""
    if settings.drop_scan == "off" or settings.space != "sparsity" or settings.multi_objective:
        return False
    return settings.drop_scan == "on" or not settings.enqueue


def run_length(blocks: int) -> int:
    """Blocks per scan unit by default: about a tenth of the depth (single blocks up to 14 blocks deep, runs of 3
    on SmolLM2's 30)."""
    return max(1, round(blocks / 10))


def scan_size(space: Space, run: int | None = None) -> int:
    """The most trials a scan measures: one per run of ``run`` adjacent blocks, then the best 2 … ``MAX_TOGETHER``
    single drops together, or the non-overlapping pairs of the ``BEST_RUNS`` best runs and the profiles of the
    best drop set."""
    blocks = len(set(space.blocks))
    run = _unit(space, run)
    runs = blocks - run + 1
    if run == 1:
        return runs + max(0, min(blocks, MAX_TOGETHER) - 1)
    best = min(runs, BEST_RUNS)
    return runs + best * (best - 1) // 2 + len(PROFILE_SLOPES) * len(PROFILE_PROTECT)


def drop_scan(study: optuna.Study, ws, rule: faults.StopRule, storage: str | None = None,
              progress: bool = False, run: int | None = None) -> None:
    """Run (or resume) the scan on the best completed trial so far, with units of ``run`` adjacent blocks (None:
    ``run_length``); skipped, with a log line, when it would take more than half the trials left after the queued
    seeds. Scan trials are measured in full and enter the study like any other."""
    from tqdm.auto import tqdm

    space = ws.space
    run = _recorded_run(study) or _unit(space, run)
    left = rule.left(study) - len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))  # after the seeds
    size = scan_size(space, run)
    if rule.trials is not None and 2 * size > left and not _scanned(study):
        log.info("drop scan skipped: its %d trials would take more than half of the %d left", size, left)
        return
    with tqdm(desc="drop scan", disable=not progress, dynamic_ncols=True) as bar:
        _scan(study, ws, run, storage, lambda: _measure_waiting(study, ws, rule, bar))


def _scan(study: optuna.Study, ws, run: int, storage: str | None, measure) -> None:
    space = ws.space
    measure()  # the seeds first: the scan starts from the best of them
    base = _base(study)
    if base is None:
        return
    alloc = np.asarray(base.user_attrs["allocation"], dtype=np.float64)
    blocks = sorted(set(int(b) for b in space.blocks))
    units = {_label(r): r for r in (tuple(blocks[i:i + run]) for i in range(len(blocks) - run + 1))}
    _enqueue(study, ws, {name: _drop(space, alloc, r) for name, r in units.items()}, base, run, storage)
    measure()
    scanned = _results(study)
    gains = sorted((scanned[name].value - base.value, r) for name, r in units.items() if name in scanned)
    good = [r for _, r in gains if clears_noise(scanned[_label(r)], base)]
    sets = _together(good, run)
    _enqueue(study, ws, {name: _drop(space, alloc, drop) for name, drop in sets.items()}, base, run, storage)
    measure()
    if run > 1 and good:
        scanned = _results(study)
        candidates = {name: list(r) for name, r in units.items()} | sets
        best = min((name for name in candidates if name in scanned), key=lambda n: scanned[n].value, default=None)
        if best is not None and clears_noise(scanned[best], base):
            log.info("drop scan: profiles of the blocks %s keeps", best)
            _enqueue(study, ws, _profiles(space, candidates[best], run), base, run, storage)
            measure()
    log.info("drop scan from trial %d (%.4f): %d of %d drops improve it beyond noise (best: %s)", base.number,
             base.value, len(good), len(units), ", ".join(f"{_label(r)} {g:+.4f}" for g, r in gains[:3]))


def clears_noise(trial: optuna.trial.FrozenTrial, base: optuna.trial.FrozenTrial, z: float = NOISE_Z) -> bool:
    """Whether ``trial`` beats ``base`` by more than ``z`` standard errors of their paired per-sequence fitness
    differences (``fitness_rows``; trials recorded without them: by the sign of the difference alone)."""
    if trial.value >= base.value:
        return False
    a, b = trial.user_attrs.get("fitness_rows"), base.user_attrs.get("fitness_rows")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return True
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return bool(diff.mean() < -z * diff.std(ddof=1) / np.sqrt(diff.size))


def _unit(space: Space, run: int | None) -> int:
    """Blocks per unit: ``run`` (default ``run_length``), at most the model's depth."""
    blocks = len(set(space.blocks))
    return min(run or run_length(blocks), blocks)


def _recorded_run(study: optuna.Study) -> int | None:
    """The unit length of a scan already in the study, which a resumed scan keeps (scans from before runs
    existed recorded none: single blocks), else None."""
    return next((t.user_attrs.get("drop_run", 1) for t in study.get_trials(deepcopy=False)
                 if "drop_base" in t.user_attrs), None)


def _label(run: tuple[int, ...]) -> str:
    return f"block-{run[0]}" if len(run) == 1 else f"run-{run[0]}-{run[-1]}"


def _together(good: list[tuple[int, ...]], run: int) -> dict[str, list[int]]:
    """The drop sets measured after the units, from the improving units best first: single blocks in order of
    gain (``top-2`` … ``top-8``, the gains roughly add); runs in every non-overlapping pair of the best
    ``BEST_RUNS`` (``pair-3-5+13-15``): neighbouring runs share blocks and the best of them cluster, so the best
    pair is often not the two best runs."""
    if run == 1:
        top = [r[0] for r in good[:MAX_TOGETHER]]
        return {f"top-{k}": top[:k] for k in range(2, len(top) + 1)}
    best = good[:BEST_RUNS]
    return {f"pair-{a[0]}-{a[-1]}+{b[0]}-{b[-1]}": sorted(a + b)
            for i, a in enumerate(best) for b in best[i + 1:] if not set(a) & set(b)}


def _profiles(space: Space, dropped: list[int], run: int) -> dict[str, np.ndarray]:
    """The drop set ``dropped`` with the kept blocks re-shaped: sparsity rising linearly with depth by each of
    ``PROFILE_SLOPES``, the first ``run`` blocks lowered by each of ``PROFILE_PROTECT``, then shifted together onto
    the budget (``profile-0.2-first-0.06``)."""
    blocks = np.asarray(space.blocks, dtype=np.float64)
    depth = blocks / max(blocks.max(), 1.0)
    out = {}
    for slope in PROFILE_SLOPES:
        for protect in PROFILE_PROTECT:
            shape = space.target + slope * (depth - 0.5) - protect * (blocks < min(blocks) + run)
            out[f"profile-{slope:g}-first-{protect:g}"] = _drop(space, shape, dropped)
    return out


def _drop(space: Space, alloc: np.ndarray, blocks) -> np.ndarray:
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


def _enqueue(study: optuna.Study, ws, children: dict[str, np.ndarray], base, run: int,
             storage: str | None) -> None:
    """Queue the scan trials not yet queued or measured (under the study lock, as the seeds are)."""
    with storages.study_lock(study._storage, storage, ws.out, study.study_name):
        present = {t.user_attrs.get("guide") for t in study.get_trials(deepcopy=False)
                   if t.state != TrialState.FAIL or faults.FAIL_REASON in t.user_attrs}
        for name, x in children.items():
            label = f"{SCAN}/{name}"
            if label not in present:
                study.enqueue_trial({param_name(u): float(v) for u, v in zip(ws.space.units, x)},
                                    user_attrs={"guide": label, "drop_base": base.number, "drop_run": run})


def _results(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The completed scan trials by name (``block-3``, ``run-3-5``, ``top-2``, …)."""
    head = f"{SCAN}/"
    return {t.user_attrs["guide"][len(head):]: t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if str(t.user_attrs.get("guide", "")).startswith(head)}


def _measure_waiting(study: optuna.Study, ws, rule: faults.StopRule, bar) -> None:
    """Measure the queued trials, within the run's stop rule, counting them on the scan's bar."""
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    bar.total = (bar.total or 0) + min(waiting, rule.left(study))
    faults.run_queued(study, ws.objective, rule, lambda *_: bar.update())
