"""End to end in headless Chromium, one GUI for all: the DreamBooth, Fine-tune and Textual Inversion tabs each load
their 'Demo (tiny model, CPU)' preset (the first load makes the tiny model and dataset, the fine-tune one also its
metadata JSON), Start it, and the run monitor shows the run completed at 100 % with the trained file listed; the LoRA
tab does the same with 'Demo FLUX (tiny model, CPU)' (a FLUX.1 LoRA through flux_train_network).

The same GUI then runs a tool from the Utilities tab (resize_lora on a tiny LoRA: the run monitor shows it completed
with its output, which goes into the LoRA tab's network_weights) and edits a caption in the caption editor.

Needs /usr/bin/chromium and Python playwright; skipped without them. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import json
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
DEMO = "Demo (tiny model, CPU)"
#: (kind = element id prefix, tab label, the run's final output file)
TABS = [("dreambooth", "DreamBooth", "demo_dreambooth.safetensors"),
        ("finetune", "Fine-tune", "demo_finetune.safetensors"),
        ("ti", "Textual Inversion", "demo_embedding.safetensors")]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One GUI process (temp jobs, demo and user-preset folders; the file browser's root is the module's folder) for
    the whole module: (port, folder)."""
    folder = tmp_path_factory.mktemp("gui_tabs")
    config = folder / "config.toml"
    config.write_text(f"[gui]\nbrowse_roots = [{json.dumps(str(folder))}]\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOHYA_GUI_DEMO_DIR", str(folder / "demo"))
        mp.setenv("KOHYA_GUI_USER_PRESETS", str(folder / "user_presets"))
        proc, port = start_server(["--config", str(config)], folder)
    try:
        yield port, folder
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def page(app):
    playwright = pytest.importorskip("playwright.sync_api")
    port, _ = app
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        # the page holds every option of four trainers plus the Utilities tab: on a loaded 2-core box one action
        # (a click waiting for the page to settle) can take longer than playwright's default 30 s
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#lora-start", timeout=60_000)
        yield page
        browser.close()


def wait_for(predicate, timeout: float, what: str, page=None, interval: float = 0.25, shot: str = "timeout"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    if page is not None:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"gui_tabs_{shot}_timeout.png"), full_page=True)
    raise AssertionError(f"timed out waiting for {what}")


def progress(page) -> tuple[str, int, str]:
    el = page.locator("#run-progress .kg-progress")
    if el.count() == 0:
        return "", 0, ""
    return (el.get_attribute("data-status") or "", int(el.get_attribute("data-percent") or 0),
            el.inner_text())


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def test_a_tool_runs_from_the_utilities_tab_and_a_caption_is_edited(page, app, tiny_sd1):
    """First in the module: it needs no demo run, and a fresh page answers fastest."""
    from PIL import Image

    from test_gui_tools import make_lora

    _, folder = app
    started = time.monotonic()
    lora = make_lora(tiny_sd1, folder / "my lora.safetensors")
    print(f"tiny LoRA made in {time.monotonic() - started:.1f}s")
    out = folder / "resized.safetensors"
    page.get_by_role("tab", name="Utilities", exact=True).click()
    page.locator("#tool-choice input").click()
    page.get_by_role("option", name="LoRA: Resize a LoRA (lower rank)").click()
    page.wait_for_selector("#tool-resize_lora-run", state="visible", timeout=30_000)
    field(page, "tool-resize_lora-model").fill(lora)
    field(page, "tool-resize_lora-save_to").fill(str(out))
    field(page, "tool-resize_lora-new_rank").fill("2")
    page.locator("#tool-resize_lora-run").click()
    message = page.locator("#tool-message")
    text = wait_for(lambda: re.search(r"(?:Started|Queued) job `?([0-9]{8}-[0-9]{6}-\S+?-[0-9a-f]{6})\b",
                                      message.inner_text()) or "Not started" in message.inner_text()
                    and message.inner_text(), 60, "the tool job to start", page, shot="tool")
    assert not isinstance(text, str), text
    job_id = text.group(1)
    wait_for(lambda: job_id in page.locator("#run-status").inner_text() and progress(page)[0] in (
        "completed", "failed"), 120, "the tool job to end", page, interval=0.5, shot="tool")
    assert progress(page)[:2] == ("completed", 100), page.locator("#run-log textarea").input_value()
    wait_for(lambda: "resized.safetensors" in page.locator("#run-outputs").inner_text(), 30, "the output listed",
             page, shot="tool")
    assert out.is_file()
    print(f"resize_lora ran from the Utilities tab: {time.monotonic() - started:.1f}s since the test started")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gui_utilities_tool.png"), full_page=True)

    # the result becomes the LoRA tab's network_weights
    page.locator("#tool-result-refresh").click()
    wait_for(lambda: field(page, "tool-result").input_value() == str(out), 30, "the result in the list", page,
             shot="tool")
    page.locator("#tool-result-use").click()
    wait_for(lambda: field(page, "lora-network_weights").input_value() == str(out), 30, "network_weights filled",
             page, shot="tool")

    # caption editor: load a folder, edit a caption, save it in place; the tag counts follow
    data = folder / "captions" / "5_sks"
    data.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("sks, red")
    page.get_by_role("tab", name="Caption editor", exact=True).click()
    field(page, "caption-folder").fill(str(folder / "captions"))
    page.locator("#caption-load").click()
    wait_for(lambda: "3 images" in page.locator("#caption-status").inner_text(), 30, "the captions page", page,
             shot="captions")
    wait_for(lambda: page.locator("#caption-image-0 img").count() == 1, 30, "a thumbnail", page, shot="captions")
    assert "red 3" in page.locator("#caption-tags").inner_text()
    field(page, "caption-text-1").fill("sks, blue")
    page.locator("#caption-save").click()
    wait_for(lambda: "Saved 1" in page.locator("#caption-save-message").inner_text(), 30, "the save", page,
             shot="captions")
    assert (data / "1.txt").read_text() == "sks, blue"
    wait_for(lambda: "blue 1" in page.locator("#caption-tags").inner_text(), 30, "the new tag counted", page,
             shot="captions")
    page.screenshot(path=str(ARTIFACTS / "gui_caption_editor.png"), full_page=True)
    print(f"tool and caption editor checked in {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("kind, label, output", TABS, ids=[t[0] for t in TABS])
def test_demo_preset_runs_to_completion_from_its_tab(page, app, kind, label, output):
    run_demo(page, app, kind, label, output, DEMO)


def test_flux_demo_lora_runs_to_completion(page, app):
    """The FLUX.1 demo in the LoRA tab: the preset makes the tiny FLUX.1-dev files (transformer, clip_l, t5xxl, ae),
    selects the FLUX.1 family (its part-file fields shown), and Start runs flux_train_network to its LoRA."""
    _, folder = app
    run_demo(page, app, "lora", "LoRA", "demo_flux_lora.safetensors", "Demo FLUX (tiny model, CPU)",
             check=lambda: _flux_form_shown(page, folder))


def _flux_form_shown(page, folder) -> None:
    assert "FLUX.1" in page.locator("#lora-model_family input").first.input_value()
    for part in ("clip_l", "t5xxl", "ae"):
        field = page.locator(f"#lora-{part} input, #lora-{part} textarea").first
        assert field.is_visible() and field.input_value().endswith(f"{part}.safetensors"), part
        assert (folder / "demo" / "model-flux" / f"{part}.safetensors").is_file()
    assert page.locator("#lora-v2").first.is_hidden()  # an SD 2.x option: not shown for FLUX.1
    assert page.locator("#lora-clip_skip").first.is_hidden()  # every family has it; FLUX.1 refuses it


def run_demo(page, app, kind, label, output, preset, check=None):
    _, folder = app
    started = time.monotonic()
    page.get_by_role("tab", name=label, exact=True).click()
    page.wait_for_selector(f"#{kind}-start", state="visible", timeout=30_000)
    assert page.locator(f"#{kind}-notice").is_hidden(), f"the {label} tab says its trainer is missing"
    message = page.locator(f"#{kind}-message")

    page.locator(f"#{kind}-preset input").click()
    page.get_by_role("option", name=preset, exact=True).click()
    page.locator(f"#{kind}-load-preset").click()
    wait_for(lambda: "Loaded preset" in message.inner_text() or "not loaded" in message.inner_text(), 300,
             f"the {label} demo preset to load", page, shot=kind)
    assert "Loaded preset" in message.inner_text(), message.inner_text()
    assert page.locator(f"#{kind}-output_name input, #{kind}-output_name textarea").first.input_value() == \
        output.removesuffix(".safetensors")
    if kind == "finetune":
        assert (folder / "demo" / "dataset" / "meta.json").is_file()
    if check is not None:
        check()

    page.locator(f"#{kind}-start").click()
    text = wait_for(lambda: re.search(r"Started job `?([0-9]{8}-[0-9]{6}-\w+-[0-9a-f]+)", message.inner_text())
                    or "Not started" in message.inner_text() and message.inner_text(), 120,
                    f"the {label} job to start", page, shot=kind)
    assert not isinstance(text, str), f"{text}\n{page.locator(f'#{kind}-preflight').inner_text()}"
    job_id = text.group(1)
    # the monitor shows the new job (not the previous tab's finished one) until it completes
    wait_for(lambda: job_id in page.locator("#run-status").inner_text() and progress(page)[0] in (
        "completed", "failed", "stopped"), 300, f"the {label} run to end", page, interval=0.5, shot=kind)
    status, percent, bar = progress(page)
    if status != "completed":
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"gui_tab_{kind}_failed.png"), full_page=True)
    assert status == "completed", f"{page.locator('#run-status').inner_text()}\n{page.locator('#run-log textarea').input_value()}"
    assert percent == 100 and "100 %" in bar, bar
    wait_for(lambda: output in page.locator("#run-outputs").inner_text(), 30, f"{output} in the outputs", page,
             shot=kind)
    assert (folder / "demo" / "output" / output).is_file()
    wait_for(lambda: page.locator("#run-samples img").count() >= 1, 30, "a sample image", page, shot=kind)
    try:  # let the gallery's thumbnails load before the screenshot (cosmetic: never fails the test)
        page.wait_for_function("[...document.querySelectorAll('#run-samples img')].every(i => i.complete "
                               "&& i.naturalWidth > 0)", timeout=10_000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError
        pass
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"gui_tab_{kind}.png"), full_page=True)
    print(f"{label}: demo run completed in {time.monotonic() - started:.1f}s from the tab")

