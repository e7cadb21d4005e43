"""A bootstrap ensemble of gradient-boosted trees predicting an allocation's fitness, with uncertainty.

Each member is an XGBoost model trained on a bootstrap resample of the pairs; the ensemble mean is the prediction
and the spread across members its uncertainty (what the search's confidence bound explores with). Members learn
a transformed target (log-fitness, or the fitness rank in [0, 1], or a pairwise ranking score); every member's
output is mapped back to fitness units, so ``predict`` speaks fitness whatever the target. Saved as one XGBoost
JSON file per member plus ``predictor.json`` (params, feature spec, training hash, metrics, versions): no pickle.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import numpy as np
import xgboost as xgb
from sklearn.base import BaseEstimator, RegressorMixin

from prunesearch.files import atomic_json, read_json
from prunesearch.safety import UserError, first_line

FORMAT = "prunesearch-predictor/1"
TARGETS = ("log", "rank")
OBJECTIVES = ("regression", "pairwise")


def data_hash(X: np.ndarray, y: np.ndarray) -> str:
    """A short hash of the training pairs, recorded with the model."""
    h = hashlib.sha256(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


class FitnessPredictor(RegressorMixin, BaseEstimator):
    """Bootstrap ensemble of XGBoost models; ``predict(X, return_std=True)`` gives mean and spread in fitness units."""

    def __init__(self, n_members: int = 8, target: str = "log", objective: str = "regression",
                 n_estimators: int = 200, max_depth: int = 3, learning_rate: float = 0.05, subsample: float = 0.8,
                 colsample_bytree: float = 0.8, min_child_weight: float = 1.0, random_state: int = 0,
                 n_jobs: int = 1):
        self.n_members = n_members
        self.target = target
        self.objective = objective
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _booster_params(self, seed: int) -> dict:
        params = {"max_depth": self.max_depth, "eta": self.learning_rate, "subsample": self.subsample,
                  "colsample_bytree": self.colsample_bytree, "min_child_weight": self.min_child_weight,
                  "seed": seed, "nthread": self.n_jobs, "tree_method": "exact"}
        if self.objective == "pairwise":
            params.update(objective="rank:pairwise", lambdarank_pair_method="mean",
                          lambdarank_num_pair_per_sample=8)
        else:
            params["objective"] = "reg:squarederror"
        return params

    def _check(self, X: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (pairs × features), got shape {X.shape}")
        if hasattr(self, "n_features_in_") and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the predictor was trained on {self.n_features_in_}")
        if y is not None:
            if len(y) != len(X):
                raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
            if len(y) < 2:
                raise ValueError(f"need at least 2 training pairs, got {len(y)}")
            if not np.all(np.isfinite(y)) or (self.target == "log" and np.any(np.asarray(y) <= 0)):
                raise ValueError("fitness values must be finite (and positive for the log target)")
        return X

    def fit(self, X: np.ndarray, y: np.ndarray) -> FitnessPredictor:
        if self.target not in TARGETS:
            raise UserError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.n_members < 1:
            raise UserError("n_members must be at least 1")
        X = self._check(X, y)
        y = np.asarray(y, dtype=np.float64)
        self.n_features_in_ = X.shape[1]
        rng = np.random.default_rng(self.random_state)
        self.boosters_: list[xgb.Booster] = []
        self.calibration_: list[tuple[list[float], list[float]]] = []
        self.y_sorted_ = np.sort(y).tolist()
        t = self._transform(y)
        for i in range(self.n_members):
            idx = rng.integers(0, len(y), len(y)) if self.n_members > 1 else np.arange(len(y))
            if self.objective == "pairwise":
                # relevance: higher is better; the lowest fitness of the resample gets the highest level
                order = np.argsort(np.argsort(-y[idx], kind="stable"), kind="stable")
                dm = xgb.DMatrix(X[idx], label=order.astype(np.float64), qid=np.zeros(len(idx), dtype=np.int64))
            else:
                dm = xgb.DMatrix(X[idx], label=t[idx])
            booster = xgb.train(self._booster_params(int(rng.integers(0, 2**31 - 1))), dm,
                                num_boost_round=self.n_estimators)
            self.boosters_.append(booster)
            if self.objective == "pairwise":
                raw = booster.predict(xgb.DMatrix(X[idx]))
                self.calibration_.append((np.sort(-raw.astype(np.float64)).tolist(), np.sort(y[idx]).tolist()))
        return self

    def _transform(self, y: np.ndarray) -> np.ndarray:
        if self.target == "log":
            return np.log(y)
        ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
        return ranks / max(len(y) - 1, 1)

    def _member_fitness(self, i: int, raw: np.ndarray) -> np.ndarray:
        """One member's raw output in fitness units."""
        raw = raw.astype(np.float64)
        if self.objective == "pairwise":
            scores, ys = self.calibration_[i]
            return np.interp(-raw, scores, ys)
        if self.target == "log":
            return np.exp(raw)
        grid = np.linspace(0.0, 1.0, len(self.y_sorted_))
        return np.interp(raw, grid, self.y_sorted_)

    def member_predictions(self, X: np.ndarray) -> np.ndarray:
        """(members × n) predictions in fitness units."""
        if not hasattr(self, "boosters_"):
            raise ValueError("this predictor is not fitted yet")
        X = self._check(X)
        if len(X) == 0:  # nothing to score (e.g. every candidate of a round was a duplicate)
            return np.empty((len(self.boosters_), 0))
        dm = xgb.DMatrix(X)
        return np.stack([self._member_fitness(i, b.predict(dm)) for i, b in enumerate(self.boosters_)])

    def predict(self, X: np.ndarray, return_std: bool = False):
        """Predicted fitness (lower is better); with ``return_std`` also the spread across ensemble members."""
        p = self.member_predictions(X)
        mean = p.mean(axis=0)
        return (mean, p.std(axis=0)) if return_std else mean

    def lower_bound(self, X: np.ndarray, kappa: float) -> np.ndarray:
        """Optimistic fitness, the members' mean − ``kappa`` × their spread, taken on the scale the members are fit
        on (log-fitness for the log target, mapped back): in fitness units a heavy-tailed fitness such as perplexity
        has a spread near its mean, and the bound would favour the most uncertain points over the best."""
        return self.predict_with_bound(X, kappa)[2]

    def predict_with_bound(self, X: np.ndarray, kappa: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict(X, return_std=True)`` and ``lower_bound(X, kappa)`` from one pass over the members."""
        p = self.member_predictions(X)
        mean, std = p.mean(axis=0), p.std(axis=0)
        if self.target == "log" and self.objective != "pairwise":
            logs = np.log(p)
            return mean, std, np.exp(logs.mean(axis=0) - kappa * logs.std(axis=0))
        return mean, std, mean - kappa * std

    def save(self, path: Path, feature_spec: dict, training: dict | None = None, metrics: dict | None = None
             ) -> None:
        """Write ``member-K.json`` per member and ``predictor.json`` into the folder ``path``."""
        if not hasattr(self, "boosters_"):
            raise ValueError("this predictor is not fitted yet")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("member-*.json"):
            old.unlink()
        for i, b in enumerate(self.boosters_):
            b.save_model(str(path / f"member-{i}.json"))
        import optuna
        import sklearn

        meta = {"format": FORMAT, "params": self.get_params(), "n_features_in": self.n_features_in_,
                "feature_spec": feature_spec, "y_sorted": self.y_sorted_, "calibration": self.calibration_,
                "training": training or {}, "metrics": metrics or {},
                "versions": {"xgboost": xgb.__version__, "scikit-learn": sklearn.__version__,
                             "numpy": np.__version__, "optuna": optuna.__version__,
                             "python": platform.python_version()}}
        atomic_json(path / "predictor.json", meta, indent=1)  # written last: a folder without it is incomplete

    @classmethod
    def load(cls, path: Path) -> tuple[FitnessPredictor, dict]:
        """The predictor saved in ``path`` and its metadata (feature spec, training, metrics)."""
        path = Path(path)
        meta_path = path / "predictor.json"
        if not meta_path.exists():
            raise UserError(f"{path} is not a predictor folder (no predictor.json)")
        meta = read_json(meta_path, "predictor record")
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
        model = cls(**meta["params"])
        model.n_features_in_ = meta["n_features_in"]
        model.y_sorted_ = meta["y_sorted"]
        model.calibration_ = [tuple(c) for c in meta["calibration"]]
        model.boosters_ = []
        for i in range(model.n_members):
            b = xgb.Booster()
            try:
                b.load_model(str(path / f"member-{i}.json"))
            except xgb.core.XGBoostError as e:
                raise UserError(f"{path / f'member-{i}.json'} is not a readable predictor member "
                                f"({first_line(e)})") from e
            model.boosters_.append(b)
        return model, meta
