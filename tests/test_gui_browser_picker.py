"""In headless Chromium: a remote-style user loads the demo preset, picks the dataset folder with the server-side file
browser (no typed path), starts the run and sees it complete. Skipped without /usr/bin/chromium or playwright."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_gui_browser import ARTIFACTS, CHROMIUM, browser, progress, wait_for  # noqa: F401 - fixture
from test_gui_launcher import start_server, stop_server

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def test_pick_the_dataset_with_the_file_browser_and_start_the_demo(browser, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KOHYA_GUI_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("KOHYA_GUI_USER_PRESETS", str(tmp_path / "user_presets"))
    config = tmp_path / "config.toml"
    config.write_text(f"[gui]\nbrowse_roots = [{json.dumps(str(tmp_path))}]\n")
    proc, port = start_server(["--config", str(config)], tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(120_000)  # a big page on a loaded 2-core box (see test_gui_browser_tabs)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#lora-start", timeout=60_000)
        page.locator("#lora-preset input").click()
        page.get_by_role("option", name="Demo (tiny model, CPU)").click()
        page.locator("#lora-load-preset").click()
        wait_for(lambda: "Loaded preset" in page.locator("#lora-message").inner_text(), 300,
                 "the demo preset to load", page)
        dataset = field(page, "lora-train_data_dir")
        dataset.fill("")
        dataset.press("Tab")

        # browse: the first root, then demo/ -> dataset/ -> select train/ and use it for "train_data_dir"
        page.locator("#lora-browser").get_by_text("Browse server files").first.click()
        page.locator("#lora-browse-go").click()
        for folder in ("demo/", "dataset/"):
            wait_for(lambda f=folder: page.locator("#lora-browse-entries").get_by_text(f, exact=True).count(), 30,
                     f"{folder} in the listing", page)
            page.locator("#lora-browse-entries").get_by_text(folder, exact=True).click()
            page.locator("#lora-browse-open").click()
        wait_for(lambda: page.locator("#lora-browse-entries").get_by_text("train/", exact=True).count(), 30,
                 "train/ in the listing", page)
        page.locator("#lora-browse-entries").get_by_text("train/", exact=True).click()
        page.locator("#lora-browse-use").click()
        picked = str((tmp_path / "demo" / "dataset" / "train").resolve())
        wait_for(lambda: dataset.input_value() == picked, 30, "the picked path in the field", page)

        page.locator("#lora-start").click()
        wait_for(lambda: "Started job" in page.locator("#lora-message").inner_text(), 120, "the job to start", page)
        wait_for(lambda: progress(page)[0] == "completed", 600, "the run to complete", page, interval=0.5)
        jobs = list((tmp_path / "jobs").iterdir())
        stored = [json.loads((j / "job.json").read_text()) for j in jobs if (j / "job.json").is_file()]
        assert [s["values"]["train_data_dir"] for s in stored] == [picked]
        assert (tmp_path / "demo" / "output" / "demo_lora.safetensors").is_file()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gui_file_browser_run.png"), full_page=True)
    finally:
        stop_server(proc)
