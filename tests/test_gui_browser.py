"""End to end in headless Chromium: the demo preset trains a real LoRA (tiny model, CPU) from the browser, the run
monitor shows progress to 100 %, the loss chart and samples; a second run is stopped and ends 'stopped' with a LoRA.

Needs /usr/bin/chromium (test.sh installs it) and Python playwright; skipped without them.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from test_gui_launcher import start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


@pytest.fixture()
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        yield browser
        browser.close()


def wait_for(predicate, timeout: float, what: str, page=None, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    if page is not None:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gui_browser_timeout.png"), full_page=True)
    raise AssertionError(f"timed out waiting for {what}")


def progress(page) -> tuple[str, int, str]:
    el = page.locator("#run-progress .kg-progress")
    if el.count() == 0:
        return "", 0, ""
    return (el.get_attribute("data-status") or "", int(el.get_attribute("data-percent") or 0),
            el.inner_text())


def test_demo_run_and_stop_from_the_browser(browser, tmp_path, monkeypatch):
    monkeypatch.setenv("KOHYA_GUI_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("KOHYA_GUI_USER_PRESETS", str(tmp_path / "user_presets"))
    proc, port = start_server([], tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(120_000)  # a big page on a loaded 2-core box (see test_gui_browser_tabs)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#lora-start", timeout=60_000)

        # choose the demo preset and load it (the first load makes the tiny model and dataset)
        page.locator("#lora-preset input").click()
        page.get_by_role("option", name="Demo (tiny model, CPU)").click()
        page.locator("#lora-load-preset").click()
        wait_for(lambda: "Loaded preset" in page.locator("#lora-message").inner_text(), 300,
                 "the demo preset to load", page)
        assert page.locator("#lora-output_name input, #lora-output_name textarea").first.input_value() == \
            "demo_lora"

        # run 1: to the end
        page.locator("#lora-start").click()
        wait_for(lambda: "Started job" in page.locator("#lora-message").inner_text(), 120, "the job to start",
                 page)
        wait_for(lambda: progress(page)[0] == "completed", 600, "the run to complete", page, interval=0.5)
        status, percent, text = progress(page)
        assert percent == 100 and "100 %" in text, text
        wait_for(lambda: page.locator("#run-samples img").count() >= 1, 30, "a sample image", page)
        wait_for(lambda: page.locator("#run-loss canvas, #run-loss svg").count() >= 1, 30, "the loss chart", page)
        assert "demo_lora.safetensors" in page.locator("#run-outputs").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gui_job_view.png"), full_page=True)

        # run 2: long, stopped from the browser: it saves and ends 'stopped'
        steps = page.locator("#lora-max_train_steps input")
        steps.fill("100000")
        steps.press("Tab")
        page.locator("#lora-output_name input, #lora-output_name textarea").first.fill("stopped_lora")
        page.locator("#lora-start").click()
        wait_for(lambda: "Started job" in page.locator("#lora-message").inner_text()
                 and progress(page)[0] == "running" and re.search(r"step [1-9]", progress(page)[2]), 300,
                 "the second run to make steps", page)
        page.locator("#lora-stop").click()
        wait_for(lambda: progress(page)[0] == "stopped", 180, "the run to stop", page, interval=0.5)
        wait_for(lambda: "stopped_lora" in page.locator("#run-outputs").inner_text(), 30, "the saved LoRA", page)
        assert (tmp_path / "demo" / "output" / "stopped_lora.safetensors").is_file()
        page.screenshot(path=str(ARTIFACTS / "gui_job_view_stopped.png"), full_page=True)

        # the Jobs tab lists both runs
        page.get_by_role("tab", name="Jobs").click()
        wait_for(lambda: page.locator("#jobs-table").inner_text().count("lora") >= 2, 30, "the jobs list", page)
        table = page.locator("#jobs-table").inner_text()
        assert "completed" in table and "stopped" in table
    finally:
        stop_server(proc)
