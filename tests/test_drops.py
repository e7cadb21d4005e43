"""The block-drop scan (``search.drops``): after the seeds, every block (or run of adjacent blocks) of the best seed
nearly removed in turn, then the improving drops together; measured in full, labelled, resumable, and off where it
does not apply."""

from __future__ import annotations

import json
import logging

import numpy as np
import optuna
import pandas as pd
import pytest

from conftest import search_argv
from prunesearch.cli import main
from search.drops import clears_noise, drop_scan, run_length, scan_size
from search.faults import StopRule
from search.samplers import drop_blocks, param_name
from search.space import Space


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))


def test_drop_blocks_sends_blocks_to_the_top_and_keeps_the_budget():
    space = Space(units=tuple(f"u{i}" for i in range(6)), members=tuple((f"u{i}",) for i in range(6)),
                  sizes=np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]), blocks=(0, 0, 1, 1, 2, 2), target=0.6,
                  low=0.2, high=0.95)
    parent = np.full(6, 0.6)
    child = drop_blocks(space, parent, [1], 0.95)
    assert child[2:4] == pytest.approx([0.95, 0.95])
    # 0.35 of 3 weights freed, spread over the other 6 weights: each other unit 0.175 lower
    assert child[[0, 1, 4, 5]] == pytest.approx([0.425] * 4)
    assert child @ space.sizes / space.sizes.sum() == pytest.approx(0.6)


class _Linear:
    """A stand-in workspace whose fitness is linear in the per-block sparsities (weights ``cost``): dropping
    block b improves it exactly when ``cost[b]`` is below the mean of the others' (equal block sizes)."""

    def __init__(self, out, cost):
        self.out, self.cost = out, np.asarray(cost, dtype=np.float64)
        n = len(cost)
        self.space = Space(units=tuple(map(str, range(n))), members=tuple((str(i),) for i in range(n)),
                           sizes=np.ones(n), blocks=tuple(range(n)), target=0.6, low=0.3, high=0.95)

    def objective(self, trial) -> float:
        x = np.array([trial.suggest_float(param_name(u), self.space.low, self.space.high) for u in self.space.units])
        alloc = self.space.project(x)
        trial.set_user_attr("allocation", alloc.tolist())
        return float(self.cost @ alloc)


def test_the_scan_combines_the_improving_drops_best_first(tmp_path):
    ws = _Linear(tmp_path, [3.0, -1.0, 1.0, -2.0, 2.0])
    study = optuna.create_study()
    for x in (np.full(5, 0.6), np.array([0.5, 0.7, 0.6, 0.7, 0.5])):
        study.enqueue_trial({param_name(u): float(v) for u, v in zip(ws.space.units, x)}, user_attrs={"seed": "s"})
    drop_scan(study, ws, StopRule(trials=40, deadline=None))
    trials = study.get_trials()
    base = min(trials[:2], key=lambda t: t.value)
    by = {t.user_attrs.get("guide"): t for t in trials[2:]}
    assert sorted(by) == sorted([f"drop-scan/block-{b}" for b in range(5)] + ["drop-scan/top-2"])
    assert all(t.user_attrs["drop_base"] == base.number for t in by.values())
    gains = {b: by[f"drop-scan/block-{b}"].value - base.value for b in range(5)}
    # cost[1] = -1 and cost[3] = -2 lie below the others' means (1 and 1.25): those two improve, block 3 most
    assert [b for b in sorted(gains, key=gains.get) if gains[b] < 0] == [3, 1]
    pair = np.array(by["drop-scan/top-2"].user_attrs["allocation"])
    assert pair[[1, 3]] == pytest.approx([0.95, 0.95]) and pair.mean() == pytest.approx(0.6)
    assert by["drop-scan/top-2"].value < min(by["drop-scan/block-1"].value, by["drop-scan/block-3"].value)
    drop_scan(study, ws, StopRule(trials=40, deadline=None))  # resumed: nothing new
    drop_scan(study, ws, StopRule(trials=40, deadline=None), run=2)  # nor with runs: the scan keeps its units
    assert len(study.get_trials()) == len(trials)


def test_runs_are_scanned_then_the_best_four_paired_where_they_do_not_overlap(tmp_path):
    # blocks 3-4 and 7-8 are cheap: the four best runs of three are 2-4, 3-5, 6-8 and 7-9 in some order, and of
    # their pairs only the four that share no block are measured
    ws = _Linear(tmp_path, [3.0, 2.0, 1.0, -2.0, -2.0, 1.0, 0.5, -1.5, -1.5, 0.8, 2.5, 3.0])
    study = optuna.create_study()
    study.enqueue_trial({param_name(u): 0.6 for u in ws.space.units}, user_attrs={"seed": "uniform"})
    drop_scan(study, ws, StopRule(trials=60, deadline=None), run=3)
    by = {t.user_attrs["guide"][len("drop-scan/"):]: t for t in study.get_trials()[1:]}
    base = study.get_trials()[0].value
    runs = {name: t.value - base for name, t in by.items() if name.startswith("run-")}
    assert sorted(runs) == sorted(f"run-{b}-{b + 2}" for b in range(10))
    best = sorted((g, name) for name, g in runs.items() if g < 0)[:4]
    assert sorted(name for _, name in best) == ["run-2-4", "run-3-5", "run-6-8", "run-7-9"]
    pairs = {name for name in by if name.startswith("pair-")}
    assert pairs == {"pair-2-4+6-8", "pair-2-4+7-9", "pair-3-5+6-8", "pair-3-5+7-9"}
    assert len(by) == scan_size(ws.space, 3) - 2  # 10 runs + 4 of the 6 pairs of the best four + 9 profiles
    chosen = np.array(by["pair-3-5+7-9"].user_attrs["allocation"])  # six of twelve dropped: projected onto 0.6
    dropped = np.isin(np.arange(12), [3, 4, 5, 7, 8, 9])
    assert chosen[dropped] == pytest.approx([0.9] * 6) and chosen[~dropped] == pytest.approx([0.3] * 6)
    assert min(by[p].value for p in pairs) < min(t.value for name, t in by.items() if name.startswith("run-"))
    drop_scan(study, ws, StopRule(trials=60, deadline=None), run=3)  # resumed: nothing new
    assert len(study.get_trials()) == 1 + len(by)
    drop_scan(study, ws, StopRule(trials=60, deadline=None), run=1)  # resumed with another unit: the scan's own
    assert len(study.get_trials()) == 1 + len(by)


def test_the_best_drop_set_is_measured_under_profiles_of_the_blocks_it_keeps(tmp_path):
    # runs of 3 of 12 blocks: only runs into the free last blocks improve, all overlapping, so run-9-11 is the best
    # set; the first run is dearest, so the steepest profile with the most protected first run wins
    ws = _Linear(tmp_path, [3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    study = optuna.create_study()
    study.enqueue_trial({param_name(u): 0.6 for u in ws.space.units}, user_attrs={"seed": "uniform"})
    drop_scan(study, ws, StopRule(trials=60, deadline=None), run=3)
    by = {t.user_attrs["guide"][len("drop-scan/"):]: t for t in study.get_trials()[1:]}
    assert not any(name.startswith("pair-") for name in by)
    profiles = {name: t for name, t in by.items() if name.startswith("profile-")}
    assert sorted(profiles) == sorted(f"profile-{s:g}-first-{p:g}" for s in (0.1, 0.2, 0.3) for p in (0, 0.06, 0.12))
    for t in profiles.values():
        x = np.array(t.user_attrs["allocation"])
        assert x.mean() == pytest.approx(0.6) and x[9:].min() >= x[:9].max()
    flat, kept = (np.array(profiles[f"profile-0.3-first-{p}"].user_attrs["allocation"]) for p in (0, 0.12))
    assert (kept[:3] < flat[:3]).all() and np.all(np.diff(flat[:9]) >= 0)
    assert min(profiles, key=lambda n: profiles[n].value) == "profile-0.3-first-0.12"
    assert profiles["profile-0.3-first-0.12"].value < by["run-9-11"].value == min(
        t.value for name, t in by.items() if not name.startswith("profile-"))
    drop_scan(study, ws, StopRule(trials=60, deadline=None), run=3)  # resumed: nothing new
    assert len(study.get_trials()) == 1 + len(by) == 1 + 10 + 9


class _Noisy(_Linear):
    """``_Linear`` with per-sequence fitness terms (``fitness_rows``) on 8 sequences: every sequence reads the linear
    fitness, plus ``swing`` × (block 1's sparsity above 0.6) with alternating sign and a net lean of ``lean``."""

    def __init__(self, out, cost, swing: float, lean: float):
        super().__init__(out, cost)
        self.wave = swing * np.array([1.0, -1.0] * 4) + lean

    def objective(self, trial) -> float:
        value = super().objective(trial)
        alloc = np.array(trial.user_attrs["allocation"])
        rows = value + self.wave * max(alloc[1] - 0.6, 0.0)
        trial.set_user_attr("fitness_rows", rows.tolist())
        return float(rows.mean())


def test_a_drop_whose_gain_is_within_the_noise_of_the_sequences_is_not_combined(tmp_path, caplog):
    # cost as above: dropping blocks 1 and 3 improves the mean; block 1's gain is swamped by its per-sequence swing
    cost = [3.0, -1.0, 1.0, -2.0, 2.0]
    ws = _Noisy(tmp_path, cost, swing=20.0, lean=0.0)
    study = optuna.create_study()
    study.enqueue_trial({param_name(u): 0.6 for u in ws.space.units}, user_attrs={"seed": "uniform"})
    with caplog.at_level(logging.INFO, logger="prunesearch.search"):
        drop_scan(study, ws, StopRule(trials=40, deadline=None))
    by = {t.user_attrs["guide"]: t for t in study.get_trials()[1:]}
    base = study.get_trials()[0]
    assert by["drop-scan/block-1"].value < base.value and by["drop-scan/block-3"].value < base.value
    assert clears_noise(by["drop-scan/block-3"], base) and not clears_noise(by["drop-scan/block-1"], base)
    assert sorted(by) == [f"drop-scan/block-{b}" for b in range(5)]  # one drop clears the noise: nothing to combine
    assert "1 of 5 drops improve it beyond noise" in caplog.text

    # the same swing with a lean that clears it: both drops count and are combined
    study = optuna.create_study()
    study.enqueue_trial({param_name(u): 0.6 for u in ws.space.units}, user_attrs={"seed": "uniform"})
    drop_scan(study, _Noisy(tmp_path, cost, swing=0.5, lean=-0.5), StopRule(trials=40, deadline=None))
    assert "drop-scan/top-2" in {t.user_attrs["guide"] for t in study.get_trials()[1:]}


def test_clears_noise_compares_paired_sequence_differences():
    def trial(rows):
        return optuna.trial.create_trial(value=float(np.mean(rows)), user_attrs={"fitness_rows": list(rows)})

    base = trial([1.0, 2.0, 3.0, 4.0])
    assert clears_noise(trial([0.9, 1.9, 2.9, 3.9]), base)  # 0.1 lower on every sequence: far beyond the noise
    assert not clears_noise(trial([0.5, 2.5, 2.5, 4.1]), base)  # 0.1 lower on average, ±0.5 per sequence
    assert clears_noise(trial([0.5, 2.5, 2.5, 4.1]), base, z=0.1)
    assert not clears_noise(trial([1.1, 2.1, 3.1, 4.1]), base)  # worse is never a gain
    bare = optuna.trial.create_trial(value=2.4)  # no rows recorded (older runs): the sign alone
    assert clears_noise(bare, base) and not clears_noise(optuna.trial.create_trial(value=2.6), base)


@pytest.mark.parametrize("kind", ["kl", "ppl"])
def test_a_measured_allocation_records_its_per_sequence_terms(kind, tiny_llama_dir, tiny_calib_file, tmp_path):
    from conftest import search_settings
    from search.engine import Workspace

    ws = Workspace(search_settings(tiny_llama_dir, tiny_calib_file, fitness=kind), tmp_path / "ws")
    result = ws.measure(np.asarray(ws.seeds()["atp-0.2"]))
    rows = np.asarray(result["fitness_rows"])
    assert rows.shape == (6,) and rows.std() > 0  # one mean term per held-out sequence, and they differ
    undo = np.exp if kind == "ppl" else (lambda v: v)
    assert undo(rows.mean()) == pytest.approx(result["fitness"], rel=1e-5)
    assert undo(rows[:2].mean()) == pytest.approx(result["fitness_low"], rel=1e-5)


def test_the_default_unit_is_a_tenth_of_the_depth():
    assert [run_length(n) for n in (4, 6, 12, 24, 30, 32, 80)] == [1, 1, 1, 2, 3, 3, 8]
    space = _Linear(None, np.zeros(30)).space
    assert scan_size(space) == 28 + 6 + 9 and scan_size(space, 1) == 30 + 7
    assert scan_size(_Linear(None, np.zeros(6)).space) == 6 + 5


def _trials(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "trials.parquet")


def test_the_scan_measures_every_drop_of_the_best_seed_then_the_best_together(tiny_llama_dir, tiny_calib_file,
                                                                              tmp_path):
    out = tmp_path / "run"
    extra = ("--select-top", "0", "--sampler", "evo")
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, *extra, trials=24)) == 0
    t = _trials(out)
    seeds = t[t.label.isin(["uniform", "owl"]) | t.label.str.startswith("atp-")]
    base = seeds.loc[seeds.fitness.idxmin()]
    single = t[t.label.str.startswith("drop-scan/block-")]
    assert sorted(single.label) == [f"drop-scan/block-{b}" for b in range(4)]
    assert (single.state == "COMPLETE").all() and single.number.min() > seeds.number.max()
    units = [c for c in t.columns if c.startswith("s[")]
    for _, row in single.iterrows():  # the dropped block at the bound, the others pruned less, on the budget
        b = int(row.label.rsplit("-", 1)[1])
        assert row[f"s[{b}]"] == pytest.approx(0.9)
        others = [u for u in units if u != f"s[{b}]"]
        assert (row[others].to_numpy() <= base[others].to_numpy() + 1e-9).all()
        assert row.budget_sparsity == pytest.approx(0.7)
    assert (t.label == "evo").sum() == 24 - len(seeds) - len(single) - t.label.str.startswith("drop-scan/top-").sum()
    best = json.loads((out / "best_config.json").read_text())
    assert best["meta"]["fitness"] == pytest.approx(t.query("state == 'COMPLETE'").fitness.min())

    # the same command with more trials resumes: the scan is not repeated
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, *extra, trials=28)) == 0
    again = _trials(out)
    scan = t.label.str.startswith("drop-scan/").sum()
    assert len(again) == 28 and again.label.str.startswith("drop-scan/").sum() == scan


def test_drop_run_sets_the_units_from_the_command_line(tiny_llama_dir, tiny_calib_file, tmp_path):
    out = tmp_path / "run"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, "--select-top", "0", "--drop-run", "2",
                            trials=40)) == 0
    t = _trials(out)
    scan = t[t.label.str.startswith("drop-scan/")]
    runs = scan[scan.label.str.startswith("drop-scan/run-")]
    assert sorted(runs.label) == ["drop-scan/run-0-1", "drop-scan/run-1-2", "drop-scan/run-2-3"]
    for _, row in runs.iterrows():
        first, last = map(int, row.label.split("run-")[1].split("-"))
        assert row[f"s[{first}]"] == pytest.approx(0.9) and row[f"s[{last}]"] == pytest.approx(0.9)
    # the one pair of 2-block runs that do not overlap, measured only if both improve on the base; then, if any
    # drop improved on it, the nine profiles of the best
    sets = scan[~scan.label.str.startswith("drop-scan/profile-")]
    assert set(sets.label) - set(runs.label) <= {"drop-scan/pair-0-1+2-3"}
    seeds = t[t.label.isin(["uniform", "owl"]) | t.label.str.startswith("atp-")]
    assert len(scan) - len(sets) == (9 if sets.fitness.min() < seeds.fitness.min() else 0)
    assert (runs.state == "COMPLETE").all() and (scan.number > runs.number.min() - 1).all()


def test_drop_run_below_one_is_refused(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, "--drop-run", "0")) == 2
    err = capsys.readouterr().err
    assert "--drop-run must be a whole number of blocks >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value, why", [("wiki", "must be one of c4, wikitext2, ptb or a mix"),
                                        ("c4+c4", "a held-out mix joins distinct names")])
def test_a_bad_fitness_data_is_refused(tiny_llama_dir, tiny_calib_file, tmp_path, capsys, value, why):
    out = tmp_path / "run"
    assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, "--fitness-data", value)) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("extra, why", [
    (("--drop-scan", "off"), None),
    (("--enqueue", "START"), None),  # auto: a search started from an earlier answer (coarse to fine's 2nd stage)
    ((), "drop scan skipped: its 7 trials would take more than half of the 5 left"),
])
def test_no_scan_where_it_is_off_or_does_not_fit(extra, why, tiny_llama_dir, tiny_calib_file, tmp_path, caplog):
    out = tmp_path / "run"
    trials = 12 if why else 24
    if "START" in extra:
        start = tmp_path / "start.json"
        start.write_text(json.dumps({"sparsity": {str(b): 0.6 + 0.05 * b for b in range(4)}}))
        extra = ("--enqueue", start)
    with caplog.at_level(logging.INFO, logger="prunesearch.search"):
        assert main(search_argv(tiny_llama_dir, tiny_calib_file, out, "--select-top", "0", *extra, trials=trials)) == 0
    assert not _trials(out).label.str.startswith("drop-scan/").any()
    if why:
        assert why in caplog.text


def test_drop_scan_on_is_refused_where_it_cannot_apply(tiny_llama_dir, tiny_calib_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = search_argv(tiny_llama_dir, tiny_calib_file, out, "--budget", "sparsity=0.6:0.8", "--drop-scan", "on")
    assert main(argv) == 2
    assert "--drop-scan on scans one budget" in capsys.readouterr().err
    assert not out.exists()
