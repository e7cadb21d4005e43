"""The report's figures (matplotlib): anytime curves, allocations (or widths) against the heuristic seeds, predictor
rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SEED_STYLES = {"uniform": dict(c="0.3", ls="--"), "owl": dict(c="C2", ls="-."), "atp": dict(c="C3", ls=":"),
               "flap": dict(c="m", ls="-.")}
SOLID = ("C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9")  # colours not taken by the seed families


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def anytime(frame: pd.DataFrame) -> pd.DataFrame:
    """Best measured fitness so far after each completed trial, by trial number and by seconds since the start."""
    done = frame[frame["state"] == "COMPLETE"].copy()
    start = pd.to_datetime(done["start"])
    done["elapsed_s"] = (start - start.min()).dt.total_seconds() + done["wall_s"].fillna(0)
    by_number = done.sort_values("number")
    by_time = done.sort_values("elapsed_s")
    return pd.DataFrame({"number": by_number["number"].to_numpy(),
                         "best_by_number": by_number["fitness"].cummin().to_numpy(),
                         "elapsed_s": by_time["elapsed_s"].to_numpy(),
                         "best_by_time": by_time["fitness"].cummin().to_numpy()})


def plot_anytime(runs: dict[str, pd.DataFrame], fitness_kind: str, path: Path) -> Path:
    """Best fitness against trials and against wall time, one line per run."""
    fig, (a, b) = _plt().subplots(1, 2, figsize=(10, 3.6))
    for i, (name, frame) in enumerate(runs.items()):
        curve = anytime(frame)
        a.step(curve["number"], curve["best_by_number"], where="post", c=f"C{i}", label=name)
        b.step(curve["elapsed_s"], curve["best_by_time"], where="post", c=f"C{i}", label=name)
    done = next(iter(runs.values()))
    done = done[done["state"] == "COMPLETE"]
    seeds = done[done["label"].str.split("-").str[0].isin(list(SEED_STYLES))]
    a.scatter(seeds["number"], seeds["fitness"], marker="x", c="0.4", s=20, label="heuristic seeds", zorder=3)
    a.set(xlabel="trial number", ylabel=f"best {fitness_kind} so far (search data)", yscale="log")
    b.set(xlabel="wall time since the first trial (s)", ylabel=f"best {fitness_kind} so far", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _unit_axis(ax, unit_names: list[str]) -> None:
    if all(u.isdigit() for u in unit_names):
        ax.set_xlabel("block")
    else:
        ax.set_xlabel("projection (block.name)")
        ax.set_xticks(range(len(unit_names)))
        ax.set_xticklabels([".".join(u.split(".")[-3:]) for u in unit_names], rotation=90, fontsize=5)


def _lines(ax, x: np.ndarray, lines: dict[str, np.ndarray]) -> None:
    """One line per labelled allocation: seeds in their family's style, the rest solid."""
    solid = 0
    for label, values in lines.items():
        family = label.split("@")[0].split("-")[0]
        if family in SEED_STYLES:
            ax.plot(x, values, lw=1, alpha=0.8, label=label, **SEED_STYLES[family])
        else:
            ax.plot(x, values, "o-", ms=3, lw=2, c=SOLID[solid % len(SOLID)], label=label)
            solid += 1
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_allocations(lines: dict[str, np.ndarray], unit_names: list[str], path: Path) -> Path:
    """Sparsity per unit of each labelled allocation; seeds get their family's style, the rest solid lines."""
    fig, ax = _plt().subplots(figsize=(10, 3.8))
    _lines(ax, np.arange(len(unit_names)), lines)
    _unit_axis(ax, unit_names)
    ax.set_ylabel("sparsity")
    return _save(fig, path)


def plot_widths(lines: dict[str, np.ndarray], unit_names: list[str], path: Path) -> Path:
    """Kept share per block of each labelled width allocation (units ``<block>.attn``/``<block>.mlp``): key/value
    groups (attention) on the left, MLP channels on the right."""
    fig, axes = _plt().subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, kind, title in zip(axes, ("attn", "mlp"), ("attention: key/value groups kept", "MLP: channels kept")):
        pick = [i for i, u in enumerate(unit_names) if u.endswith(f".{kind}")]
        blocks = np.array([int(unit_names[i].split(".")[0]) for i in pick])
        _lines(ax, blocks, {label: np.asarray(v)[pick] for label, v in lines.items()})
        ax.set(title=title, xlabel="block", ylim=(0, 1.05))
        ax.set_xticks(blocks)
    axes[0].set_ylabel("share kept")
    return _save(fig, path)


def plot_predictor(pred: pd.DataFrame, taus: pd.DataFrame, fitness_kind: str, path: Path) -> Path:
    """Predicted against measured fitness of the predictor-chosen trials, by round; Kendall τ per round."""
    fig, (a, b) = _plt().subplots(1, 2, figsize=(10, 3.8))
    for r, group in pred.groupby("round"):
        a.scatter(group["measured"], group["predicted"], s=14, c=[_plt().cm.viridis(r / max(pred["round"].max(), 1))],
                  label=f"round {r}")
    lo = float(min(pred["measured"].min(), pred["predicted"].min()))
    hi = float(max(pred["measured"].max(), pred["predicted"].max()))
    a.plot([lo, hi], [lo, hi], c="0.5", lw=0.8)
    a.set(xlabel=f"measured {fitness_kind}", ylabel=f"predicted {fitness_kind}")
    a.legend(fontsize=6, ncol=2)
    b.plot(taus["round"], taus["prospective_tau"], "o-", label="τ on the round's measured candidates")
    b.plot(taus["round"], taus["cv_tau"], "s--", label="τ, 3-fold CV of the round's predictor")
    b.axhline(0, c="0.5", lw=0.8)
    b.set(xlabel="predictor round", ylabel="Kendall τ", ylim=(-1.05, 1.05))
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _save(fig, path)
