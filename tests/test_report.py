"""``prunesearch report``: a self-contained HTML page that renders in a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest
from conftest import search_settings

from prunesearch.cli import main
from prunesearch.report import load_run, predictions
from search.engine import run_search
from search.guided import Guide, GuideConfig

FAST = dict(warmup=8, screen=500, local=0.5, batch=8, screen_top=4, measure=3, members=3, trees=30)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tiny_calib_file, tmp_path_factory):
    """A predictor-guided 14-trial run (two rounds) and a 24-trial budget-range run (past its 21 seeds), tiny
    LLaMA."""
    base = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNESEARCH_CACHE", str(base / "cache"))
    run_search(search_settings(tiny_llama_dir, tiny_calib_file), base / "guided", trials=14, report_ppl=(),
               progress=False, guide=Guide(GuideConfig(**FAST)))
    run_search(search_settings(tiny_llama_dir, tiny_calib_file, budget="sparsity=0.5:0.7", sampler="nsga2"),
               base / "range", trials=24, report_ppl=(), progress=False)
    mp.undo()
    return base / "guided", base / "range"


def _render(page, tmp_path) -> tuple[str, str]:
    """(the <body> tag after load, Chromium's stderr) for a page opened in headless Chromium."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / f"profile-{page.stem}"
    done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return re.search(r"<body[^>]*>", done.stdout).group(0), done.stderr


def test_search_writes_a_report_that_renders_with_every_image(runs, tmp_path):
    guided, _ = runs
    page = guided / "report.html"  # written by the search itself
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|file:|/)', text)  # self-contained: nothing fetched
    assert {p.name for p in (guided / "report_figures").iterdir()} == {"anytime.png", "allocation.png",
                                                                        "predictor.png"}
    body, log = _render(page, tmp_path)
    assert 'data-images="ok:3"' in body
    assert ":CONSOLE" not in log  # no console message, hence no script error


def test_the_browser_check_catches_a_broken_image_and_a_script_error(runs, tmp_path):
    guided, _ = runs
    text = (guided / "report.html").read_text()
    start = text.index("base64,") + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + "AAAA" + text[start + 4:].replace("</body>", "<script>nosuch()</script></body>"))
    body, log = _render(broken, tmp_path)
    assert 'data-images="broken:1"' in body
    assert "Uncaught ReferenceError" in log


def test_predictor_panel_pairs_each_chosen_trial_with_its_measured_fitness(runs):
    guided, _ = runs
    run = load_run(guided)
    pred = predictions(run)
    assert len(run.rounds) >= 2 and set(pred["round"]) == {r["round"] for r in run.rounds}
    frame = pd.read_parquet(guided / "trials.parquet").set_index("number")
    assert pred["measured"].tolist() == frame.loc[pred["number"], "fitness"].tolist()
    assert (pred["predicted"] > 0).all()


def test_compare_and_range_reports(runs, tmp_path, capsys):
    guided, ranged = runs
    out = tmp_path / "both.html"
    assert main(["report", str(guided), "--compare", str(ranged), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Compared runs" in text and "guided" in text and "range" in text
    assert "differs from the first run in" in text and "budget" in text
    assert main(["report", str(ranged), "--out", str(tmp_path / "range.html")]) == 0
    text = (tmp_path / "range.html").read_text()
    assert "Pareto front: fitness against sparsity" in text and "front@0.5" in text
    assert len(re.findall(r"<img ", text)) == 2  # allocations and the run's own pareto.png
    body, log = _render(tmp_path / "range.html", tmp_path)
    assert 'data-images="ok:2"' in body and ":CONSOLE" not in log
    assert main(["report", str(guided), "--out", str(tmp_path / "x.png")]) == 2
    assert "--out must name an .html file" in capsys.readouterr().err
