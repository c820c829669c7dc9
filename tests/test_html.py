"""The HTML report as a reader sees it: a real (small) run's results rendered into one page and opened in headless
Chromium. The table shows the JSON report's numbers, the figures are drawn, the page fetches and runs nothing, and
a model's response that holds markup is shown as text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdbench.report.build import build_report
from kdbench.report.render import render

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Starts from the shipped tiny teacher, so only the students train: a few steps each, two training seeds.
EXPERIMENT = f"""
name: html
protocol: uniform
data: {{dataset: tiny, options: {{n_train: 200, n_validation: 8, n_test: 24, list_towns: [3, 5]}}, max_length: 64,
       max_prompt_length: 48}}
models: {{scale: tiny, families: [gpt2], teachers: {{gpt2: {REPO / "experiments" / "teachers" / "gpt2"}}}}}
teacher: {{train: false}}
init: {{training: {{engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}}}
training: {{engine: accelerate, lr: 5.0e-3, batch_size: 32, max_steps: 4}}
selection: {{every: 2}}
methods: {{sft: {{}}, kd: {{kd_ratio: 0.5}}}}
evaluation: {{seeds: [10, 20], max_new_tokens: 12, batch_size: 24}}
seeds: [0, 1]
"""
SCRIPT = "<script>window.__pwned=1</script>"
IMAGE = '<img src=x onerror="window.__pwned=2">'
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()), reason=(
    "needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`; .ci/run does)"))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Callable[..., dict[str, str]]) -> Path:
    root = tmp_path_factory.mktemp("html")
    (root / "html.yaml").write_text(EXPERIMENT)
    completed = subprocess.run([sys.executable, "-m", "kdbench", "run", "-e", str(root / "html.yaml"), "--out",
                                str(root / "out")], capture_output=True, text=True, timeout=600,
                               # One thread: these models are too small to gain from two, and on a busy
                               # machine OpenMP's spinning threads made the run five times slower.
                               env=subprocess_env(KDBENCH_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    # A model answer that is markup: the page must show it, not run it.
    samples_path = root / "out" / "cells" / "gpt2" / "s1" / "kd" / "seed0" / "samples.json"
    samples = json.loads(samples_path.read_text())
    samples[0]["response"] = f"before {SCRIPT} middle {IMAGE} after"
    samples_path.write_text(json.dumps(samples))
    return root / "out"


@pytest.fixture(scope="module")
def page(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    html = tmp_path_factory.mktemp("page") / "report.html"
    html.write_text(render(build_report(run_dir), "html"), encoding="utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1600,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(html.as_uri())
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def test_the_run_writes_per_example_scores_that_add_up_to_its_metrics(run_dir: Path) -> None:
    cells = sorted(run_dir.glob("cells/**/result.json"))
    assert len(cells) == 5  # the teacher, sft and kd over two training seeds
    for path in cells:
        result = json.loads(path.read_text())
        examples = json.loads((path.parent / "examples.json").read_text())
        assert result["schema_version"] == examples["schema_version"] == 4
        own = examples["sets"][""]
        assert len(own["task"]) == len(own["gold_words"]) == result["eval_examples"] == 24
        for metric, by_seed in result["metrics"].items():
            for seed, value in by_seed.items():
                assert np.mean(own["scores"][metric][seed]) == pytest.approx(value, abs=1e-3)


def test_the_table_shows_the_json_reports_numbers(page: Any, run_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    records = {f"{r['family']}/{r['student']}/{r['method']}": r for r in json.loads(render(build_report(run_dir), "json"))}
    shown = page.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    assert [row.get_attribute("data-row") for row in shown] == list(records)
    for row in shown:
        record = records[row.get_attribute("data-row")]
        cells = {cell.get_attribute("data-field"): cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")}
        for metric in ("rougeL", "exact_match"):
            expected = [record[f"{metric}_mean"]]
            expected += [] if record[f"{metric}_std"] is None else [record[f"{metric}_std"]]
            expected += record[f"{metric}_ci95"] or []
            assert numbers(cells[f"{metric}_mean"]) == pytest.approx(expected, abs=0.006), (metric, cells)
        assert numbers(cells["n_train_seeds"]) == [record["n_train_seeds"], record["n_eval_seeds"]]
        assert numbers(cells["optimizer_steps"]) == [record["optimizer_steps"], record["optimizer_steps_total"]]
        assert numbers(cells["wall_seconds"]) == pytest.approx([record["wall_seconds"]], abs=0.06)
        assert cells["rank"] == ("—" if record["rank"] is None else str(record["rank"]))
        if record["gap_recovered"] is not None:
            gap = [record["gap_recovered"], *record["gap_recovered_ci95"]]
            assert numbers(cells["gap_recovered"]) == pytest.approx(gap, abs=0.006)
    assert records["gpt2/s1/kd"]["n_train_seeds"] == 2 and records["gpt2/s1/kd"]["rougeL_ci95"] is not None


def test_the_figures_are_drawn(page: Any) -> None:
    from selenium.webdriver.common.by import By

    figures = page.find_elements(By.CSS_SELECTOR, "figure.plot svg")
    assert len(figures) == 3  # per method, against cost, validation curves: one family
    for figure in figures:
        assert figure.size["width"] > 100 and figure.size["height"] > 50
        assert len(figure.find_elements(By.CSS_SELECTOR, "path")) > 10
    curves = figures[2].text
    assert "s1/kd" in curves and "s1/sft" in curves  # the legend, drawn as text


def test_the_page_fetches_and_runs_nothing_and_shows_markup_as_text(page: Any) -> None:
    from selenium.webdriver.common.by import By

    assert page.execute_script("return typeof window.__pwned") == "undefined"
    assert not page.find_elements(By.CSS_SELECTOR, "script, link, img, iframe, [src]")
    assert all((e.get_attribute("href") or "#").startswith("#") for e in page.find_elements(By.CSS_SELECTOR, "[href]"))
    responses = [e.text for e in page.find_elements(By.CSS_SELECTOR, "pre.response")]
    assert f"before {SCRIPT} middle {IMAGE} after" in responses
