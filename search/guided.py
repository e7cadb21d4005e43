"""Predictor-guided search (Ji et al., 2023, made iterative): a boosted-tree ensemble prunes the search space.

After a warm-up of measured allocations (the heuristic seeds plus scrambled-Sobol points), every round

1. fits the predictor on all completed trials (features of the effective allocation → fitness);
2. screens random points of the current per-unit bounds, projected onto the budget (with several units per
   block, most of them random smooth depth profiles inside the bounds: ``smooth_profiles``), and narrows each unit's
   bounds to where the predicted best ``quantile`` of them lie (their ``spread``…1−``spread`` percentiles),
   widening insensitive units (rank correlation with the prediction below ``insensitive`` × the strongest)
   back to the full range and always keeping the incumbent best inside; a ``local`` share of the ``screen``
   points (default a quarter) are perturbations of the best measured allocations inside the new bounds, half of
   them smooth depth waves (random box points almost never have the smooth depth profile real models want);
   with several units per block that share grows by 1 − blocks/units of the rest and the perturbations are the
   evolution's own moves (``search.screening``);
3. asks ``batch`` candidates of the run's Optuna sampler in the narrowed space (on a throw-away copy of the
   study) plus the ``screen_top`` best screened points, and scores all by the lower confidence bound
   mean − κ·std of the ensemble on its log-fitness scale (fitness is minimized; ``FitnessPredictor.lower_bound``);
4. enqueues only the best ``measure`` for real measurement (full fidelity: the predictor is the pruner here),
   never one whose allocation was measured already (on a level grid many candidates round to one).

With ``realize`` = K > 0, every allocation that enters the K best by search fitness is first pruned for real and
re-scored (``search.realized``), and the local moves and the incumbent come from the best realized allocations.

Only measured candidates enter the study. Each round appends its bounds, predictor metrics (3-fold CV of a
single member, and the prospective τ of everything predicted before it was measured) and screening counts to
``predictor_rounds.jsonl``; the final predictor is saved under ``predictor/``. Resuming re-reads the study and
the rounds file: queued candidates of an interrupted round are measured first, then rounds continue.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from predictors.features import check_spec, features, make_spec
from predictors.metrics import cross_validate, ranking_metrics
from predictors.model import FitnessPredictor, data_hash
from prunesearch.files import repair_line_log
from search.faults import counted, run_queued, stop_rule
from search.realized import RealizedFitness
from search.samplers import make_sampler, param_name
from search.screening import box, distinct_best, local, narrow, smooth_share

log = logging.getLogger("prunesearch.search")
ROUNDS_FILE = "predictor_rounds.jsonl"


@dataclass
class GuideConfig:
    """Knobs of the guided loop; the defaults are what ``prunesearch search --predictor on`` uses."""

    warmup: int = 12
    batch: int = 32
    screen: int = 10000
    screen_top: int = 8
    measure: int = 4
    quantile: float = 0.1
    spread: float = 0.0
    local: float = 0.25
    kappa: float = 1.0
    insensitive: float = 0.25
    margin: float = 0.1
    min_width: float = 0.02
    depth_bins: int = 8
    members: int = 8
    trees: int = 200
    init: str | None = None
    realize: int = 0  # > 0: the K best by search fitness are realized; local moves start from the realized best
    seed: int | None = None  # of screening, Sobol warm-up and sampler copies (default: the run's seed)

    def predictor(self, seed: int, members: int | None = None) -> FitnessPredictor:
        return FitnessPredictor(n_members=members or self.members, n_estimators=self.trees, random_state=seed)


def _pairs(study: optuna.Study, units: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "allocation" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    allocs = np.array([t.user_attrs["allocation"] for t in done], dtype=np.float64).reshape(len(done), len(units))
    return allocs, np.array([t.value for t in done], dtype=np.float64), done


def _finished(study: optuna.Study) -> int:
    return counted(study.get_trials(deepcopy=False))


def _read_rounds(path: Path) -> list[dict]:
    if not path.exists():
        return []
    repair_line_log(path, ROUNDS_FILE)  # a partial last line left by a crash is cut before appending
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_init(path: str, spec: dict) -> FitnessPredictor:
    """A retrained predictor to warm-start from; its feature spec must match the search's."""
    model, meta = FitnessPredictor.load(Path(path))
    check_spec(spec, meta["feature_spec"])
    return model


class Guide:
    """The guided loop as ``run_search``'s optimize hook: ``Guide(config)(study, ws, trials, deadline, progress)``."""

    def __init__(self, config: GuideConfig | None = None):
        self.config = config or GuideConfig()

    def __call__(self, study: optuna.Study, ws, trials: int | None, deadline: float | None,
                 progress: bool) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        out: Path = ws.out
        rec = ws.space_record()
        rec.save(out / "space.json")
        spec = make_spec(cfg.depth_bins, rec.space)
        init = load_init(cfg.init, spec) if cfg.init else None
        units, space = ws.space.units, ws.space
        self.seed = ws.settings.seed if cfg.seed is None else cfg.seed
        self.bar = tqdm(total=trials, initial=_finished(study), desc="trials", disable=not progress,
                        dynamic_ncols=True)
        self.study, self.ws = study, ws
        self.rule = stop_rule(ws, trials, deadline)
        realized = RealizedFitness(ws, cfg.realize) if cfg.realize else None
        try:
            self._measure_queue()
            if init is None:
                self._warmup()
            rounds_path = out / ROUNDS_FILE
            rounds = _read_rounds(rounds_path)
            low = np.array(rounds[-1]["bounds"]["low"]) if rounds else np.full(space.dim, space.low)
            high = np.array(rounds[-1]["bounds"]["high"]) if rounds else np.full(space.dim, space.high)
            while not self._done():
                allocs, y, done = _pairs(study, units)
                if len(y) < 3:
                    self._measure_queue(fallback=max(1, 3 - len(y)))
                    continue
                r = len(rounds)
                newly = realized.update(done) if realized else []
                parents = realized.parents(done, y) if realized else np.argsort(y)[:3]
                t0 = time.perf_counter()
                X = features(allocs, rec, spec)
                own = init is None or len(y) >= cfg.warmup
                model = cfg.predictor(self.seed + r).fit(X, y) if own else init
                fit_s = time.perf_counter() - t0
                cv = (cross_validate(cfg.predictor(r, members=1), X, y, k=3, seed=r)[0]
                      if own and len(y) >= 6 else None)
                rng = np.random.default_rng([self.seed, r])
                share = smooth_share(space)
                n_local = int((cfg.local + (1.0 - cfg.local) * share) * cfg.screen)
                n_smooth = int(round((cfg.screen - n_local) * share))
                screened = box(space, rng, low, high, cfg.screen - n_local, n_smooth)
                mean, _, bound = model.predict_with_bound(features(screened, rec, spec), cfg.kappa)
                incumbent = space.sampled(allocs[parents[0]])
                low, high, sens = narrow(space, space.sampled(screened), mean, incumbent, cfg.quantile,
                                         cfg.insensitive, cfg.margin, cfg.min_width, cfg.spread)
                near = local(space, rng, space.sampled(allocs[parents]), low, high, n_local, share > 0)
                bound = np.concatenate([bound, model.lower_bound(features(near, rec, spec), cfg.kappa)])
                screened = np.concatenate([screened, near])
                xs, sources = self._candidates(low, high, r, space.sampled(screened), bound)
                cand = np.array([ws.allocation(x) for x in xs])
                c_mean, c_std, c_bound = model.predict_with_bound(features(cand, rec, spec), cfg.kappa)
                # an allocation that prunes as one measured already would only reuse its fitness: never pick it
                known = {ws.effective_key(a) for a in allocs}
                repeat = np.array([ws.effective_key(c) in known for c in cand])
                lcb = np.where(repeat, np.inf, c_bound)
                n = min(cfg.measure, self._left())
                chosen = [i for i in distinct_best(space.sampled(cand), lcb, n, cfg.min_width / 2)
                          if np.isfinite(lcb[i])]
                for i in chosen:
                    study.enqueue_trial({param_name(u): float(v) for u, v in zip(units, xs[i])},
                                        user_attrs={"guide": f"round-{r}/{sources[i]}", "predicted": float(c_mean[i]),
                                                    "predicted_std": float(c_std[i])})
                record = {
                    "round": r, "finished_before": _finished(study), "train_pairs": int(len(y)),
                    "predictor": "own" if own else "init", "fit_s": round(fit_s, 3),
                    "cv": cv, "prospective": self._prospective(),
                    "bounds": {"low": low.tolist(), "high": high.tolist()}, "sensitivity": sens.tolist(),
                    "widened": [u for u, lo_, hi_ in zip(units, low, high)
                                if lo_ <= space.low and hi_ >= space.high],
                    "incumbent": {"trial": done[parents[0]].number, "fitness": float(y[parents[0]]),
                                  "inside_bounds": bool(np.all((incumbent >= low) & (incumbent <= high)))},
                    "parents": [done[i].number for i in parents],
                    **({"realized": {"measured": newly, "best": {str(done[i].number): realized.scores[
                        done[i].number]["fitness"] for i in parents if done[i].number in realized.scores}}}
                       if realized else {}),
                    "screened": {"narrowing_samples": cfg.screen - n_local, "smooth_samples": n_smooth,
                                 "local_samples": n_local,
                                 "sampler_candidates": int(sum(
                        s == ws.settings.sampler for s in sources)), "screen_candidates": int(sum(
                            s == "screen" for s in sources)), "measured": len(chosen),
                        "screened_out": int(len(xs) - len(chosen)), "already_measured": int(repeat.sum())},
                    "chosen": [{"source": sources[i], "predicted": float(c_mean[i]), "std": float(c_std[i])}
                               for i in chosen],
                }
                log.info("predictor round %d: %d pairs, screened %d candidates, measuring %d (cv tau %s)", r,
                         len(y), len(xs), n, None if cv is None else f"{cv['kendall_tau']:.3f}")
                with open(rounds_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                rounds.append(record)
                self._measure_queue(fallback=0 if chosen else 1)  # nothing new screened: one sampler trial
            self._save_final(rec, spec)
        finally:
            self.bar.close()

    def _left(self) -> int:
        return self.rule.left(self.study)

    def _done(self) -> bool:
        return self.rule.reached(self.study)

    def _update_bar(self, study: optuna.Study, trial) -> None:
        self.bar.n = _finished(study)
        try:
            self.bar.set_postfix(best=f"{study.best_value:.5f}")
        except ValueError:
            pass
        self.bar.refresh()

    def _measure_queue(self, fallback: int = 0) -> None:
        """Measure every queued trial (seeds, warm-up points, chosen candidates), or ``fallback`` sampler trials."""
        run_queued(self.study, self.ws.objective, self.rule, self._update_bar, fallback)

    def _warmup(self) -> None:
        """Scrambled-Sobol allocations until ``warmup`` trials have finished (the seeds count)."""
        from scipy.stats import qmc

        space = self.ws.space
        present = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("guide") == "warmup"]
        waiting = len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        need = self.config.warmup - _finished(self.study) - waiting
        if need <= 0:
            return
        total = len(present) + need
        sobol = qmc.Sobol(space.dim, scramble=True, seed=self.seed)
        points = sobol.random_base2(max(1, int(np.ceil(np.log2(total)))))[:total]
        for u in points[len(present):]:
            x = space.low + (space.high - space.low) * u
            self.study.enqueue_trial({param_name(n): float(v) for n, v in zip(space.units, x)},
                                     user_attrs={"guide": "warmup"})
        self._measure_queue()

    def _candidates(self, low: np.ndarray, high: np.ndarray, r: int, screened: np.ndarray, score: np.ndarray
                    ) -> tuple[np.ndarray, list[str]]:
        """The run's sampler asked ``batch`` times in the narrowed space (on a copy of the study, so nothing
        unmeasured is stored), plus the best screened points; returns sampled x values and their sources."""
        cfg, ws = self.config, self.ws
        units = ws.space.units
        shadow = optuna.create_study(direction="minimize",
                                     sampler=make_sampler(ws.settings.sampler, ws.space, self.seed + 31 * r))
        shadow.add_trials(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        dists = {param_name(u): FloatDistribution(float(lo), float(hi)) for u, lo, hi in zip(units, low, high)}
        xs, sources = [], []
        for _ in range(cfg.batch):
            t = shadow.ask(dists)
            xs.append([t.params[param_name(u)] for u in units])
            sources.append(ws.settings.sampler)
        inside = np.all((screened >= low) & (screened <= high), axis=1)
        best = [i for i in np.argsort(score, kind="stable") if inside[i]][:cfg.screen_top]
        xs.extend(screened[best].tolist())
        sources.extend(["screen"] * len(best))
        return np.array(xs, dtype=np.float64), sources

    def _prospective(self) -> dict | None:
        """Rank metrics of every guided trial's prediction (made before it was measured) against its fitness."""
        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "predicted" in t.user_attrs]
        if len(done) < 3:
            return None
        return ranking_metrics(np.array([t.value for t in done]), np.array([t.user_attrs["predicted"] for t in done]))

    def _save_final(self, rec, spec: dict) -> None:
        """Fit on every completed trial and save under ``predictor/`` with 5-fold metrics."""
        allocs, y, _ = _pairs(self.study, self.ws.space.units)
        if len(y) < 5:
            return
        X = features(allocs, rec, spec)
        model = self.config.predictor(self.seed)
        metrics = cross_validate(model, X, y, k=5, seed=self.seed)[0]
        model.fit(X, y)
        training = {"runs": [str(self.ws.out)], "pairs": int(len(y)), "hash": data_hash(X, y),
                    "model": rec.model, "budget": rec.budget, "fitness_kind": rec.fitness_kind,
                    "guide": asdict(self.config)}
        model.save(self.ws.out / "predictor", spec, training, metrics)
