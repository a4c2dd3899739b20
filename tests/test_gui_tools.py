"""The Utilities tab's tools and caption editor without a browser: every field of every tool form reaches the argv
(parsed back by the tool's own parser), a tool job runs the real tool on a tiny LoRA and lists its output, paths
outside the browse roots are refused, and the caption editor saves in place, counts tags and replaces."""
from __future__ import annotations

import os
import stat

import gradio as gr
import pytest

from sd_scripts.networks.lora_tools import build_parser

from kohya_gui.captions import CaptionError, CaptionFolder, replace_tag
from kohya_gui.command import CommandError
from kohya_gui.file_browser import FileBrowser
from kohya_gui.jobs import JobManager
from kohya_gui.tool_command import build_tool_command, normalize_tool_values, tool_argv, tool_kind
from sd_scripts.tools.registry import TOOLS, installed_tools, tool_options

pytestmark = pytest.mark.timeout(240)


def sample(opt, folder) -> object:
    """A form value for `opt` that differs from its default."""
    if opt.type is bool:
        return True
    if opt.choices:
        return [c for c in opt.choices if c != opt.default][-1]
    if opt.path:
        paths = [os.path.join(folder, f"{opt.name} {i}.safetensors") for i in range(2 if opt.nargs else 1)]
        return " ".join(f"'{p}'" for p in paths) if opt.nargs else paths[0]
    if opt.nargs:
        return "0.5 -1.25" if opt.type is float else '"[1, 0, 1]" "[0.5, 1, 1]"'
    if opt.type is int:
        return 3
    if opt.type is float:
        return 0.25
    return "cuda:0"


@pytest.mark.parametrize("entry", TOOLS, ids=[e.name for e in TOOLS])
def test_every_form_field_reaches_the_tools_own_parser(entry, tmp_path):
    import importlib

    from kohya_gui.components.tool_form import ToolForm

    with gr.Blocks():
        form = ToolForm(entry, f"t-{entry.name}")
    assert [o.name for o in tool_options(entry.name)] == list(form.widgets)
    data = {form.widgets[o.name]: sample(o, str(tmp_path)) for o in form.options}
    browser = FileBrowser([str(tmp_path)])
    values = normalize_tool_values(entry.name, form.collect(data), resolve=browser.resolve)
    argv = tool_argv(entry.name, values, "python")
    assert argv[:3] == ["python", "-m", entry.module]
    module = importlib.import_module(entry.module)  # its own parser: every registered tool builds it from OPTIONS
    parsed = vars(build_parser(entry.name, "", module.OPTIONS).parse_args(argv[3:]))
    for opt in form.options:
        got = parsed[opt.name]
        want = values[opt.name]
        assert got == want and want not in (None, False), (opt.name, got, want)
    if any(o.path and o.nargs for o in form.options):  # a quoted path with a space stays one item
        assert any(a.endswith("models 1.safetensors") for a in argv)


def test_values_are_checked_and_cannot_become_options(tmp_path):
    browser = FileBrowser([str(tmp_path)])
    with pytest.raises(CommandError, match="save_to"):
        normalize_tool_values("resize_lora", {"save_to": "/etc/out.safetensors"}, resolve=browser.resolve)
    with pytest.raises(CommandError, match="new_rank"):
        normalize_tool_values("resize_lora", {"new_rank": "2.5"})
    with pytest.raises(CommandError, match="dynamic_method"):
        normalize_tool_values("resize_lora", {"dynamic_method": "nonsense"})
    with pytest.raises(CommandError, match="nonsense"):
        normalize_tool_values("resize_lora", {"nonsense": 1})
    with pytest.raises(CommandError, match="lbws"):
        normalize_tool_values("merge_lora", {"lbws": "--save_to=/etc/x"})
    with pytest.raises(CommandError, match="device"):
        normalize_tool_values("resize_lora", {"device": "cpu\n--verbose"})
    with pytest.raises(CommandError, match="file"):
        normalize_tool_values("check_lora_weights", {})
    argv = tool_argv("check_lora_weights", normalize_tool_values("check_lora_weights", {"file": "-s"}))
    assert argv[-2:] == ["--", "-s"]  # a positional after '--' is never an option
    argv = tool_argv("resize_lora", normalize_tool_values("resize_lora", {"save_to": "--verbose"}))
    assert "--save_to=--verbose" in argv and "--verbose" not in argv


def make_lora(tiny_sd1, path, dim=4) -> str:
    import torch

    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.lora import create_network

    bundle = load_model(tiny_sd1.single_file)
    net = create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family=bundle.family,
                         network_dim=dim, network_alpha=2.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in net.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    net.save_weights(str(path), metadata={"ss_network_module": "networks.lora"})
    return str(path)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd1, tmp_path_factory):
    return make_lora(tiny_sd1, tmp_path_factory.mktemp("lora") / "in.safetensors")


def wait(manager, job_id, timeout=120):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        manager.tick()
        job = manager.get(job_id)
        if job.is_final:
            return job
        time.sleep(0.2)
    raise AssertionError("the tool job did not end")


def test_a_tool_job_runs_the_real_tool_and_lists_its_output(tiny_lora, tmp_path):
    from kohya_gui.app import AppContext
    from sd_scripts.networks.lora_tools import read_lora

    ctx = AppContext(str(tmp_path / "jobs"))
    ctx.browser = FileBrowser([os.path.dirname(tiny_lora), str(tmp_path)])
    try:
        with pytest.raises(CommandError, match="model"):  # outside the browse roots
            ctx.create_tool_job("resize_lora", {"model": "/etc/passwd", "save_to": str(tmp_path / "x.safetensors")})
        out = tmp_path / "resized.safetensors"
        job = ctx.create_tool_job("resize_lora", {"model": tiny_lora, "save_to": str(out), "new_rank": 2,
                                                  "verbose": True})
        assert job.kind == tool_kind("resize_lora") and job.status == "running"
        assert job.argv[1:3] == ["-m", "sd_scripts.networks.resize_lora"] and "--new_rank=2" in job.argv
        job = wait(ctx.jobs, job.id)
        assert job.status == "completed", job.log_tail
        assert job.outputs == [str(out)] and ctx.tool_results() == [str(out)]
        assert {m.rank for m in read_lora(out).modules.values()} == {2}
        view = ctx.view(job)
        assert view.outputs == [str(out)] and view.fraction == 1.0
        assert "retained" in ctx.log_tail(job, 40)  # the tool's own report, in the log the monitor shows

        with pytest.raises(CommandError, match="model: .*missing.safetensors is not a file"):  # checked up front
            ctx.create_tool_job("resize_lora", {"model": str(tmp_path / "missing.safetensors"),
                                                "save_to": str(tmp_path / "y.safetensors")})
        with pytest.raises(CommandError, match="save_to: the folder .*nowhere does not exist"):
            ctx.create_tool_job("resize_lora", {"model": tiny_lora, "save_to": str(tmp_path / "nowhere" / "y.pt")})
        not_a_lora = tmp_path / "not_a_lora.safetensors"
        not_a_lora.write_bytes(b"garbage")
        failing = ctx.create_tool_job("resize_lora", {"model": str(not_a_lora),
                                                      "save_to": str(tmp_path / "y.safetensors")})
        failing = wait(ctx.jobs, failing.id)
        assert failing.status == "failed" and failing.exit_code == 1, failing.log_tail
        assert "not_a_lora.safetensors" in failing.error_message and not failing.outputs
    finally:
        ctx.close()


def test_a_tool_job_is_rebuilt_from_its_values_file_and_stops_at_once(tmp_path, monkeypatch):
    manager = JobManager(str(tmp_path / "jobs"))
    cmd = build_tool_command(tool_kind("check_lora_weights"), {"file": "a.safetensors"}, None, str(tmp_path / "j"))
    assert cmd.toml_path.endswith("tool.json") and cmd.argv[-2:] == ["--", "a.safetensors"]
    with pytest.raises(CommandError):
        build_tool_command("tool:no_such_tool", {}, None, str(tmp_path))
    # a long-running stand-in: the job's stop ends it at once (a tool has nothing to save)
    monkeypatch.setattr("kohya_gui.jobs.build_tool_command", lambda kind, values, accel, job_dir, python: type(cmd)(
        argv=[python, "-c", "import time; time.sleep(60)"], toml_text="{}", toml_path=os.path.join(job_dir,
        "tool.json"), prompts_text=None, prompts_path=None, values={}))
    job = manager.create(tool_kind("check_lora_weights"), {"file": "a.safetensors"})
    manager.tick()
    assert manager.get(job.id).status == "running"
    manager.stop(job.id)
    assert manager.get(job.id).status == "stopped"


# ------------------------------------------------------------------ caption editor
def dataset(tmp_path, n=5):
    from PIL import Image

    folder = tmp_path / "data" / "10_sks dog"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i:02d}.png")
        if i < n - 1:
            (folder / f"{i:02d}.txt").write_text(["sks dog, red", "sks dog, blue, red", "sks dog", "a cat, red"][i])
    return folder


def test_caption_editor_pages_saves_counts_and_replaces(tmp_path):
    from kohya_gui.captions import thumbnail

    folder = dataset(tmp_path)
    os.chmod(folder / "00.txt", 0o640)
    captions = CaptionFolder(FileBrowser([str(tmp_path)]), str(tmp_path / "data"))
    assert len(captions.images) == 5 and captions.pages(2) == 3
    page = captions.page(3, 2)
    assert [i.name for i in page] == ["04.png"] and page[0].text == ""
    assert thumbnail(page[0].image, str(tmp_path / "thumbs")).endswith(".png")

    assert captions.save(str(folder / "00.png"), "sks dog, green") is True
    assert (folder / "00.txt").read_text() == "sks dog, green"
    assert stat.S_IMODE(os.stat(folder / "00.txt").st_mode) == 0o640  # kept by the atomic replace
    assert captions.save(str(folder / "04.png"), "sks dog") and (folder / "04.txt").read_text() == "sks dog"
    assert captions.save(str(folder / "04.png"), "sks dog") is False  # unchanged: not rewritten
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    with pytest.raises(CaptionError):
        captions.save(str(tmp_path / "elsewhere.png"), "x")

    counts = captions.tag_counts()
    assert counts["sks dog"] == 4 and counts["red"] == 2 and counts["a cat"] == 1 and counts["green"] == 1

    changes = captions.changes("red", "crimson")
    assert len(changes) == 2
    assert captions.apply(changes) == 2 and (folder / "01.txt").read_text() == "sks dog, blue, crimson"
    removed = captions.changes("sks dog", "", mode="tag")
    assert len(removed) == 4 and captions.apply(removed) == 4
    assert (folder / "02.txt").read_text() == "" and (folder / "03.txt").read_text() == "a cat, crimson"
    regex = captions.changes(r"^a (\w+)", r"one \1", mode="regex")
    assert [c.new for c in regex] == ["one cat, crimson"]
    assert replace_tag("a, b, c", "b", "a") == "a, c"
    with pytest.raises(CaptionError):
        captions.changes("(", "", mode="regex")


def test_caption_editor_is_confined(tmp_path):
    folder = dataset(tmp_path, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linked_dir")
    captions = CaptionFolder(FileBrowser([str(tmp_path / "data")]), str(tmp_path / "data"))
    assert sorted(os.path.basename(p) for p in captions.images) == ["00.png", "01.png"]
    with pytest.raises(CaptionError):
        captions.save(str(folder / "link.png"), "x")
    with pytest.raises(ValueError):  # the file browser's BrowseError
        CaptionFolder(FileBrowser([str(tmp_path / "data")]), str(outside))
    with pytest.raises(CaptionError):
        CaptionFolder(FileBrowser([str(tmp_path)]), str(tmp_path / "data"), extension=".png")
    assert (outside / "secret.txt").read_text() == "secret"


def test_registry_lists_installed_torch_free_tools():
    import subprocess
    import sys

    assert installed_tools() == list(TOOLS)
    code = ("import sys; from sd_scripts.tools.registry import TOOLS, tool_options; "
            "[tool_options(t.name) for t in TOOLS]; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), timeout=60)


def test_the_file_browser_adds_to_a_list_field_and_stays_inside_its_roots(tmp_path):
    from types import SimpleNamespace

    from kohya_gui.components.path_picker import PathPicker

    (tmp_path / "a b.safetensors").write_bytes(b"")
    ctx = SimpleNamespace(browser=FileBrowser([str(tmp_path)]))
    with gr.Blocks():
        models, save_to = gr.Textbox(), gr.Textbox()
        picker = PathPicker(ctx, {"models": ("models", models), "save_to": ("save_to", save_to)}, "p",
                            multiple=("models",))
    out = picker.choose("models", str(tmp_path), "a b.safetensors", "/x/first.safetensors")
    assert out[0] == f"/x/first.safetensors '{tmp_path}/a b.safetensors'" and "models" in out[-1]
    assert picker.choose("save_to", str(tmp_path), "a b.safetensors", "")[1] == f"{tmp_path}/a b.safetensors"
    assert "Not used" in picker.choose("save_to", "/etc", "passwd", "")[-1]


def test_a_tools_progress_is_read_from_its_tqdm_bar():
    from kohya_gui.monitor import log_progress

    log = "INFO loading\n 30%|███       | 3/10 [00:01<00:02, 2.9it/s]\n 70%|███████   | 7/10 [00:02<00:01]\n"
    assert log_progress(log) == (7, 10)
    assert log_progress("INFO no bar here 3/10") is None
