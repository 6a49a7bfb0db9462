"""``ln-ray report`` on a demo run, rendered in headless Chromium."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import pytest

from ln_ray.config import load_config
from ln_ray.pipeline.job import run_score
from ln_ray.report import load_run, render_report, shown_traces, write_report
from ln_ray.schema import SELECTED_BY, TEACHER_METRICS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tiny_student_dir, tmp_path_factory):
    """The embedded demo sample, scored by the tiny student."""
    out = str(tmp_path_factory.mktemp("demo") / "out")
    run_score(
        load_config(
            "default",
            [
                f"output.path={out}",
                f"student.model={tiny_student_dir}",
                "selection.bootstrap_samples=100",
            ],
        )
    )
    return out


def test_report_content(demo_run):
    run = load_run(demo_run)
    # the agreement was counted in Ray by the reduce stage; it equals the selections' own
    agreement = run["agreement"]
    assert run["manifest"].selection["agreement"]
    for metric in SELECTED_BY:
        assert agreement.loc[metric, metric] == 1.0
    selections = run["published"].table("selections")
    lalp_galp = selections.pivot(index="prompt_id", columns="metric", values="trace_id")
    assert agreement.loc["lalp", "galp"] == pytest.approx(
        (lalp_galp["lalp"] == lalp_galp["galp"]).mean()
    )
    worst = run["scores"].disagreements
    assert len(worst) == 5 and worst["gap"].abs().is_monotonic_decreasing
    # the run's text and per-step log-probs are read for the traces shown, and for them only
    assert "step_logprobs" not in run["scores"].sample.columns and "rows" not in run
    shown = shown_traces(run["published"], worst["trace_id"].tolist())
    assert sorted(shown["trace_id"]) == sorted(worst["trace_id"])
    full = run["published"].table("scores").set_index("trace_id")
    for trace in shown.itertuples():
        assert list(trace.step_logprobs) == list(full.loc[trace.trace_id, "step_logprobs"])
        assert len(trace.step_chars) == len(trace.step_logprobs) and trace.messages
    assert shown_traces(run["published"], []).empty
    # the paired comparisons and the stability curve are in the run and on the page
    teachers = run["scores"].teachers
    pairs = run["pairs"]
    assert len(pairs) == len(teachers) * (len(teachers) - 1) * len(TEACHER_METRICS)
    assert set(run["stability"]["metric"]) == set(pairs["metric"])
    page = render_report(run)
    assert page.count("<h3>lalp</h3><table><tr><th></th>") == 1  # the lalp pair matrix
    for entry in run["manifest"].selection["stability"].values():
        assert html.escape(entry["statement"], quote=True) in page
    separated = pairs[(pairs["metric"] == "lalp") & pairs["separated"]]
    for row in separated.itertuples():
        assert f"<b>{row.mean_diff:+.4f}<br>" in page


HEADINGS = (
    "Overview",
    "Teachers",
    "Is one teacher better than another?",
    "How many prompts the ranking needs",
    "Score distributions",
    "Wins",
    "Do the metrics agree?",
    "Where local and global disagree most",
)


def _chromium():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: `make test` installs them")
        pytest.skip("chromium and chromium-driver are not installed (`make test` installs them)")
    return binary, driver


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    page = write_report(demo_run)
    assert page.endswith("report.html") and Path(page).stat().st_size > 10_000

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1366,768",
    ):  # fmt: skip  (a laptop's screen)
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(page).as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
        )
        assert len(images) == 6
        assert all(complete and width > 0 for complete, width, _ in images), images
        text = driver.find_element("tag name", "body").text
        for heading in HEADINGS:
            assert heading in text
        # The page opens with one overview (ranks by metric, the agreement, one figure) that
        # fits a laptop's width; the details follow, folded.
        first = driver.find_element("css selector", "section")
        assert first.get_attribute("id") == "overview" and first.is_displayed()
        table = first.find_element("css selector", "table.overview")
        assert "teacher-scrambled" in table.text and "lalp_token" in table.text
        assert "pick the same trace for" in first.text
        page_width, window = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert page_width <= window
        folded = driver.find_elements("css selector", "details")
        assert len(folded) == len(HEADINGS) - 1 and not any(d.get_attribute("open") for d in folded)
        assert not driver.find_element("css selector", "details table").is_displayed()
        folded[0].find_element("tag name", "summary").click()  # a reader opens the teacher table
        assert folded[0].find_element("css selector", "table").is_displayed()
        assert len(driver.find_elements("tag name", "mark")) >= 5  # least natural steps
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()


HOSTILE_TEACHERS = [
    "<script>window.pwned = 1</script>",
    "$\\frac{cost",
    "\x1b[2J\x1b[31mred\x1b[0m",
]


@pytest.fixture(scope="module")
def hostile_run(ray_cluster, tiny_student_dir, tmp_path_factory):
    """Teacher names and traces holding markup, mathtext and terminal escapes."""
    import json

    folder = tmp_path_factory.mktemp("hostile")
    rows = [
        {
            "prompt_id": f"q{p}",
            "prompt": f"What is {p} + 2? <b>bold</b>",
            "teacher": teacher,
            "response": f"First <script>window.pwned = 2</script> add {p} and 2. So $x$ = {p + 2}.",
        }
        for p in range(3)
        for teacher in HOSTILE_TEACHERS
    ]
    (folder / "in").mkdir()
    (folder / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(folder / "out")
    overrides = [f"input.path={folder / 'in'}", f"output.path={out}"]
    overrides += [f"student.model={tiny_student_dir}", "selection.bootstrap_samples=20"]
    run_score(load_config("default", overrides))
    return out


def test_markup_mathtext_and_escapes_in_the_input_show_as_text(hostile_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from ln_ray.pipeline.job import read_manifest
    from ln_ray.pipeline.summary import format_summary
    from tests.helpers import read_output

    summary = format_summary(read_manifest(hostile_run), read_output(hostile_run, "teachers"))
    assert "\x1b" not in summary and "\\x1b[2J\\x1b[31mred\\x1b[0m" in summary
    assert "<script>window.pwned = 1</script>" in summary  # a terminal shows it as it is

    page = write_report(hostile_run)  # mathtext in a teacher name is not typeset (nor fails)
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(page).as_uri())
        assert driver.execute_script("return typeof window.pwned") == "undefined"
        assert driver.execute_script("return document.scripts.length") == 0
        for folded in driver.find_elements("css selector", "details > summary"):
            folded.click()  # open every detail, as a reader would
        text = driver.find_element("tag name", "body").text
        assert "<script>window.pwned = 1</script>" in text  # the teacher's name, as text
        assert "<script>window.pwned = 2</script>" in text  # a trace's text, as text
        assert "$\\frac{cost" in text and "\\x1b[2J\\x1b[31mred" in text
        assert "<b>bold</b>" in text  # a prompt's markup, as text
    finally:
        driver.quit()
