"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven by selenium) during a real run.

RUNNER_SCREENSHOT=docs/dashboard.png keeps a screenshot of the page while the run goes (the README's).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TASK_HELPERS, free_port, start_host_run, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"),
    pytest.mark.timeout(400),  # a browser starts slowly on a busy 2-core machine
]

TASKS = TASK_HELPERS + '''
import time


def produce(ctx, n=60):
    ctx.total(n)
    for i in range(n):
        yield {"i": i}


def consume(ctx, job):
    if job["i"] >= 20:
        wait_file("go", 300)      # the page watches a run that is still going
    if job["i"] == 7:
        raise ValueError("seven is cursed")
    time.sleep(0.01)
    return result(ctx, job)
'''


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: Any, selector: str) -> str:
    """The element's text, read in the page in one go (the page redraws its tables every second)."""
    return str(driver.execute_script("var e = document.querySelector(arguments[0]); return e ? e.textContent : '';", selector))


def number(driver: Any, selector: str) -> int | None:
    value = text(driver, selector).replace(",", "")
    return int(value) if value.isdigit() else None


def test_the_page_follows_a_run_and_ends_with_the_logs_counts(folder: Path, browser: Any) -> None:
    port = free_port()
    config = {"name": "dash", "producers": [{"name": "prod", "task": "tasks:produce"}],
              "consumers": [{"name": "work", "task": "tasks:consume", "processes": 2}],
              "results": "results.jsonl", "start_method": "fork", "metrics": {"linger": 300}}
    run = start_host_run(folder, config, "--dashboard", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{port}", tasks=TASKS)
    try:
        url = wait_for(lambda: next((line.split(" ", 1)[1] for line in run.proc.stdout.splitlines() if line.startswith("dashboard: ")), None),
                       timeout=60, what="the dashboard URL on stdout")
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        # no token, no page (the page shows tracebacks); the token is not in any asset
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state?token=wrong", timeout=10)
        assert refused.value.code == 403
        browser.get(url)
        # live: 19 done and one dead-bound failure while 40 jobs wait; the page counts them as they come
        wait_for(lambda: number(browser, "#pools tr[data-pool=work] td.done") == 19, timeout=120, what="19 done on the page")
        assert text(browser, "#run-status") == "running"
        assert text(browser, "#run-id") == run.run_id
        assert "of 60 jobs" in text(browser, "#eta")
        assert number(browser, "#pools tr[data-pool=work] td.failed") == 1
        assert "seven is cursed" in text(browser, "#failures")
        jobs = browser.execute_script("return Array.from(document.querySelectorAll('#processes td.job')).map(e => e.textContent)")
        assert any(job.isdigit() and int(job) > 20 for job in jobs), jobs  # a process shows the job it waits in
        if os.environ.get("RUNNER_SCREENSHOT"):
            shot = ROOT / os.environ["RUNNER_SCREENSHOT"]
            shot.parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(shot))
        # a job's trace, as `runner logs trace 8` gives it
        box = browser.find_element("id", "job-input")
        box.send_keys("8")
        browser.find_element("id", "job-button").click()
        wait_for(lambda: "dead after 1 attempt" in text(browser, "#trace-head"), timeout=30, what="job 8's trace")
        assert "seven is cursed" in text(browser, "#trace-steps")
        # the end: the page's counts are the log's
        (folder / "go").write_text("")
        wait_for(lambda: text(browser, "#run-status").startswith("failed (exit 1)"), timeout=120, what="the end on the page")
        finished = [e for e in run.events("run.finished")][0]
        pool = finished["pools"]["work"]
        assert number(browser, "#pools tr[data-pool=work] td.done") == pool["done"] == 59
        assert number(browser, "#pools tr[data-pool=work] td.dead") == pool["dead"] == 1
        assert number(browser, "#pools tr[data-pool=work] td.failed") == pool["failed"]
        assert number(browser, "#produced") == finished["produced"] == 60
        run.process.send_signal(signal.SIGTERM)  # ends metrics.linger
        assert run.wait(60) == 1
    finally:
        run.proc.kill_group()
