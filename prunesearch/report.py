"""``prunesearch report``: one self-contained HTML page (figures embedded) of a finished search, or of several."""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prunesearch import report_figures as figs
from prunesearch.export import PROTOCOL, read_trials, units
from prunesearch.files import read_json, read_json_lines
from prunesearch.safety import UserError
from search.seeds import START
from predictors.width_features import WidthRecord

log = logging.getLogger("prunesearch.report")

SEED_FAMILIES = ("uniform", "owl", "atp", "flap")  # and every --enqueue start (search.seeds.START)
# the page marks itself once every image has decoded (data-images="ok:N" on <body>): what a browser test reads
SELF_CHECK = """<script>
window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.images = bad ? "broken:" + bad : "ok:" + document.images.length;
});
</script>"""
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f2f2f2}img{max-width:100%}.note{color:#555;font-size:.85em}
.wide{overflow-x:auto}"""


@dataclass
class Run:
    """What a run folder holds that the report shows."""

    path: Path
    frame: pd.DataFrame
    summary: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    width: WidthRecord | None = None  # a width run's space (its space.json)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def units(self) -> list[str]:
        """The search units: blocks or projections (sparsity), or ``<block>.attn``/``<block>.mlp`` (width)."""
        return list(self.width.units) if self.width else units(self.frame)

    def allocation(self, number: int) -> np.ndarray:
        """Trial ``number``'s allocation as plotted: sparsity per unit, or the kept share of a width unit."""
        row = self.frame[self.frame["number"] == number].iloc[0]
        if self.width:
            return self.width.shares([row[f"w[{u}]"] for u in self.width.units])
        return np.array([row[f"s[{u}]"] for u in self.units], dtype=float)

    @property
    def multi(self) -> bool:
        return (self.path / "pareto.csv").is_file()

    @property
    def fitness_kind(self) -> str:
        return str(self.frame["fitness_kind"].iloc[0])

    def protocol(self) -> dict:
        """Every protocol field of the run (constant across its trials), JSON values decoded."""
        row = self.frame.iloc[0]
        return {k: json.loads(row[k]) if k in ("fitness_data", "calib") else _plain(row[k]) for k in PROTOCOL}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def load_run(path: Path) -> Run:
    """Read a run folder (trials.parquet is required; report.json and predictor_rounds.jsonl when present)."""
    path = Path(path)
    frame = read_trials(path)
    summary = read_json(path / "report.json", "run report") if (path / "report.json").is_file() else {}
    rounds_file = path / "predictor_rounds.jsonl"
    rounds = read_json_lines(rounds_file, "predictor rounds log") if rounds_file.is_file() else []
    return Run(path, frame, summary, rounds, _width_record(path, frame))


def _width_record(path: Path, frame: pd.DataFrame) -> WidthRecord | None:
    """A width run's space record (None for a sparsity run); runs of older versions lack it."""
    if not any(c.startswith("w[") for c in frame.columns):
        return None
    if not (path / "space.json").is_file():
        raise UserError(f"{path} is a width run without space.json (an older version): re-run its search command "
                        "once, which resumes without new trials and writes it")
    return WidthRecord.load(path / "space.json")


def predictions(run: Run) -> pd.DataFrame:
    """Predicted and measured fitness of each predictor-chosen trial (from the run's Optuna journal)."""
    import optuna

    journal = run.path / "study.journal"
    columns = ["number", "round", "predicted", "measured"]
    if not journal.is_file():
        return pd.DataFrame(columns=columns)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    rows = []
    for name in optuna.get_all_study_names(storage):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            guide = t.user_attrs.get("guide", "")
            if t.state.name == "COMPLETE" and guide.startswith("round-") and "predicted" in t.user_attrs \
                    and "duplicate_of" not in t.user_attrs:
                rows.append({"number": t.number, "round": int(guide.split("/")[0][6:]),
                             "predicted": t.user_attrs["predicted"], "measured": t.values[0]})
    return pd.DataFrame(rows, columns=columns)


def round_taus(pred: pd.DataFrame, rounds: list[dict]) -> pd.DataFrame:
    """Kendall τ per predictor round: on the candidates it chose (measured afterwards) and its 3-fold CV."""
    from scipy.stats import kendalltau

    rows = []
    for r in rounds:
        chosen = pred[pred["round"] == r["round"]]
        tau = kendalltau(chosen["predicted"], chosen["measured"])[0] if len(chosen) >= 2 else np.nan
        rows.append({"round": r["round"], "train_pairs": r["train_pairs"], "measured": len(chosen),
                     "prospective_tau": tau, "cv_tau": (r.get("cv") or {}).get("kendall_tau", np.nan)})
    return pd.DataFrame(rows, columns=["round", "train_pairs", "measured", "prospective_tau", "cv_tau"])


def finalists(run: Run) -> pd.DataFrame:
    """The best allocation (or the Pareto front) and every heuristic seed, with measured numbers and protocol."""
    frame, s = run.frame, run.summary
    if run.multi:
        picks = [(f"front@{r.sparsity:.4g}", int(r.trial)) for r in pd.read_csv(run.path / "pareto.csv").itertuples()]
        seeds = s.get("seeds", {})
    else:
        done = frame[frame["state"] == "COMPLETE"]
        if s.get("best"):  # the final selection's pick (search.selection), else the best search fitness
            picks = [("best", int(s["best"]["trial"]))]
        else:
            picks = [("best", int(done.loc[done["fitness"].idxmin(), "number"]))] if len(done) else []
        seeds = {lab: {"trial": int(n)} for lab, n in zip(done["label"], done["number"])
                 if lab.split("-")[0].split("@")[0] in SEED_FAMILIES or lab.startswith(START)}
    picks += [(label, int(v["trial"])) for label, v in seeds.items()]
    rows = []
    for label, number in picks:
        t = frame[frame["number"] == number].iloc[0]
        row = {"allocation": label, "trial": number, "label": t["label"], "fitness": t["fitness"],
               "fitness_low": t["fitness_low"], "sparsity": t["budget_sparsity"], "nonzero_params": t["nonzero_params"],
               "trial_s": t["wall_s"]}
        for kind in ("kl", "ppl"):
            for dataset, value in s.get(f"report_{kind}", {}).get(label, {}).items():
                row[f"report {dataset} {kind}"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    for key, value in run.protocol().items():
        table[key] = value.get("dataset") if isinstance(value, dict) else value
    return table


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(frame: pd.DataFrame) -> str:
    return '<div class="wide">' + frame.to_html(index=False, float_format=lambda v: f"{v:.6g}", na_rep="",
                                                border=0) + "</div>"


def _protocol_table(run: Run) -> str:
    fields = {**run.protocol(), **{f"report {k}": v for k, v in run.summary.get("report_protocol", {}).items()}}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'><code>{html.escape(json.dumps(v))}"
                   f"</code></td></tr>" for k, v in fields.items())
    return f"<table>{rows}</table>"


def build(run_path: Path, out: Path, compare: list[Path] = ()) -> tuple[Path, list[Path]]:
    """Write ``out`` (HTML, figures embedded) and its PNGs into ``<out stem>_figures/``; returns both."""
    run = load_run(run_path)
    others = [load_run(p) for p in compare]
    folder = out.parent / f"{out.stem}_figures"
    folder.mkdir(parents=True, exist_ok=True)
    kind = run.fitness_kind
    parts = [f"<h1>prunesearch report: {html.escape(run.name)}</h1>",
             f"<p class='note'>{html.escape(str(run.path.resolve()))} &middot; {len(run.frame)} trials, "
             f"{int((run.frame['state'] == 'COMPLETE').sum())} complete &middot; fitness: {kind} on held-out "
             f"search data (lower is better); report columns are data the search never saw.</p>"]
    pngs = []
    anytime_runs = {r.name: r.frame for r in [run, *others] if not r.multi}
    if anytime_runs:
        pngs.append(figs.plot_anytime(anytime_runs, kind, folder / "anytime.png"))
        parts += ["<h2>Best fitness against trials and wall time</h2>", _img(pngs[-1], "anytime curves")]
    table = finalists(run)
    names = run.units
    lines = {lab: run.allocation(n) for lab, n in zip(table["allocation"], table["trial"])}
    comparable = [o for o in others if not o.multi and not run.multi and o.units == names]
    if comparable:  # one best line per run, the seeds of the first
        lines = {f"best ({run.name})" if lab == "best" else lab: v for lab, v in lines.items()}
        lines.update({f"best ({o.name})": o.allocation(int(finalists(o)["trial"].iloc[0])) for o in comparable})
    if run.width:
        pngs.append(figs.plot_widths(lines, names, folder / "allocation.png"))
        parts += ["<h2>Best widths per block against uniform width / FLAP</h2>", _img(pngs[-1], "widths")]
    else:
        pngs.append(figs.plot_allocations(lines, names, folder / "allocation.png"))
        title = "Pareto-front allocations" if run.multi else "Best allocation"
        parts += [f"<h2>{title} per layer against uniform / OWL / ATP</h2>", _img(pngs[-1], "allocations")]
    if run.multi and (run.path / "pareto.png").is_file():
        parts += ["<h2>Pareto front: fitness against sparsity</h2>", _img(run.path / "pareto.png", "Pareto front")]
    pred = predictions(run)
    if run.rounds and len(pred):
        taus = round_taus(pred, run.rounds)
        pngs.append(figs.plot_predictor(pred, taus, kind, folder / "predictor.png"))
        parts += ["<h2>Accuracy predictor: predicted against measured fitness</h2>", _img(pngs[-1], "predictor"),
                  _table(taus)]
    parts += ["<h2>Finalists</h2>", _table(table)]
    if "selection" in run.summary:
        sel = run.summary["selection"]
        p = sel["protocol"]
        beyond = "" if len(sel["finalists"]) <= p["top"] else " and the starts or best realized ones beyond them"
        parts += ["<h2>Final selection</h2>",
                  f"<p class='note'>The {min(len(sel['finalists']), p['top'])} best allocations by search fitness"
                  f"{beyond}, "
                  f"{html.escape(p['realized_with'])}, each measured on {p['samples']} fresh "
                  f"{html.escape(p['windows'])}; the lowest is the best above (trial {sel['chosen']}).</p>",
                  _table(pd.DataFrame(sel["finalists"]))]
    parts += ["<h2>Protocol of every number above</h2>", _protocol_table(run)]
    if others:
        parts += ["<h2>Compared runs</h2>", _compare_table([run, *others])]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>prunesearch report: "
            f"{html.escape(run.name)}</title><style>{CSS}</style></head><body>{''.join(parts)}{SELF_CHECK}"
            f"</body></html>")
    out.write_text(page)
    return out, pngs


def _compare_table(runs: list[Run]) -> str:
    """One row per run: its best fitness and protocol; fields differing from the first run are flagged."""
    first = runs[0].protocol()
    rows = []
    for r in runs:
        done = r.frame[r.frame["state"] == "COMPLETE"]
        proto = r.protocol()
        rows.append({"run": r.name, "trials": len(r.frame), "best fitness": done["fitness"].min(),
                     "differs from the first run in": ", ".join(k for k in proto if proto[k] != first[k]),
                     **{k: v.get("dataset") if isinstance(v, dict) else v for k, v in proto.items()}})
    note = ("<p class='note'>Fitness values are comparable only between runs of the same protocol "
            "(model, fitness data, samples, seqlen).</p>")
    return note + _table(pd.DataFrame(rows))


def write_default(run_path: Path) -> None:
    """The report a finished search writes into its folder (``report.html``); a failure is logged, not raised."""
    try:
        build(run_path, Path(run_path) / "report.html")
    except Exception as e:  # the search's own results are already written: never lose them to a plotting error
        log.warning("could not write report.html: %s", e)
