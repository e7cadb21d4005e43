"""How well a predictor ranks held-out allocations: Kendall τ, Spearman ρ, RMSE and top-10% precision.

Rank quality is what a search needs (it only ever compares candidates), so τ and the precision of the predicted
top decile come first; RMSE is reported for completeness. ``cross_validate`` pools out-of-fold predictions of a
K-fold split, so every pair is predicted exactly once by a model that never saw it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.base import clone
from sklearn.model_selection import KFold

from prunesearch.safety import UserError


def top_precision(y_true: np.ndarray, y_pred: np.ndarray, fraction: float = 0.1) -> float:
    """Share of the predicted best ``fraction`` (lowest fitness) that are truly among the best ``fraction``."""
    n = len(y_true)
    k = max(1, math.ceil(fraction * n))
    true_top = set(np.argsort(y_true, kind="stable")[:k].tolist())
    pred_top = np.argsort(y_pred, kind="stable")[:k].tolist()
    return sum(i in true_top for i in pred_top) / k


def ranking_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Kendall τ, Spearman ρ, RMSE and top-10% precision of predictions against measured fitness."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} measured values but {len(y_pred)} predictions")
    if len(y_true) < 3:
        raise UserError(f"need at least 3 held-out pairs for rank metrics, got {len(y_true)}")
    return {"n": int(len(y_true)), "kendall_tau": float(stats.kendalltau(y_true, y_pred).statistic),
            "spearman": float(stats.spearmanr(y_true, y_pred).statistic),
            "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2))),
            "top10_precision": float(top_precision(y_true, y_pred, 0.1))}


def cross_validate(estimator, X: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0
                   ) -> tuple[dict[str, float], np.ndarray]:
    """K-fold (shuffled) out-of-fold predictions of clones of ``estimator``; returns (metrics, predictions)."""
    X, y = np.asarray(X), np.asarray(y, dtype=np.float64)
    need = max(k, 3 if k > 2 else 4)  # every training fold must hold at least 2 pairs
    if len(y) < need:
        raise UserError(f"need at least {need} pairs for {k}-fold validation, got {len(y)}")
    pred = np.empty(len(y))
    for train, test in KFold(k, shuffle=True, random_state=seed).split(X):
        pred[test] = clone(estimator).fit(X[train], y[train]).predict(X[test])
    metrics = ranking_metrics(y, pred)
    metrics["folds"] = k
    return metrics, pred
