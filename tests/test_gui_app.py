"""The GUI app without a browser: widgets come from the schema, values round-trip to build_command for every tab,
family visibility and defaults, presets, trainer availability, pre-flight refusal, rendering, TensorBoard."""
from __future__ import annotations

import os
import sys
import time

import gradio as gr
import pytest

from kohya_gui import app as app_module
from kohya_gui.app import AppContext, build_app
from kohya_gui.command import JOB_OPTIONS, build_command, normalize_values
from kohya_gui.components.defaults import learning_rate
from kohya_gui.components.widgets import is_optional_number, to_option_value, to_widget_value
from kohya_gui.monitor import RunView
from kohya_gui.tabs import render, training
from kohya_gui.tensorboard import TensorBoard, tensorboard_argv
from sd_scripts import options as schema


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    ctx = AppContext(str(tmp_path_factory.mktemp("jobs")))
    demo = build_app(ctx)
    yield ctx, demo
    ctx.close()


def tabs(gui):
    return {tab.kind: tab for tab in gui[1].kohya_tabs}


def initial_data(tab) -> dict:
    return {c: c.value for c in tab.form.inputs}


def sample_value(opt: schema.Option, trainer: str):
    """A valid value that differs from the option's default."""
    if opt.name == "resolution":
        return "768,512"
    if opt.name == "face_crop_aug_range":
        return "2.0,4.0"
    if opt.type is bool:
        return True
    if opt.choices:
        candidates = [c for c in opt.choices if c is not None and c != opt.default]
        base = schema.defaults(trainer)
        return next(c for c in reversed(candidates) if not schema.validate({**base, opt.name: c}, trainer))
    if opt.nargs:
        return ["a=1", "b=two words"]
    if opt.type is str:
        return f"/tmp/some path/{opt.name}" if opt.path else f"text for {opt.name}"
    low = opt.minimum if opt.minimum is not None else 0
    high = opt.maximum if opt.maximum is not None else low + 100
    if opt.type is int:
        return int(min(high, max(low, 1) + 2))
    return float(min(high, low + 0.25))


EXCLUSIVE = {"network_train_text_encoder_only", "dim_from_weights"}  # pairs that may not be set together


def read_back(cmd, trainer: str, tmp_path) -> dict:
    path = tmp_path / "run.toml"
    path.write_text(cmd.toml_text)
    values = schema.defaults(trainer)
    values.update(schema.config_values(str(path), trainer))
    return values


def test_every_option_gets_one_widget_of_its_kind(gui):
    for kind, tab in tabs(gui).items():
        expected = {o.name for o in schema.options_for(tab.trainer) if not o.refused}
        assert set(tab.form.options) == expected, kind
        for name, (opt, widget) in tab.form.options.items():
            if opt.choices and not opt.nargs:
                assert isinstance(widget, gr.Dropdown), name
            elif opt.type is bool:
                assert isinstance(widget, gr.Checkbox), name
            elif opt.type is str or opt.nargs or is_optional_number(opt):
                assert isinstance(widget, gr.Textbox), name
            else:
                assert isinstance(widget, gr.Number), name
            assert widget.label == opt.title


def test_advanced_options_sit_in_an_accordion(gui):
    tab = tabs(gui)["lora"]
    for section in tab.form.sections:
        for name, (opt, widget) in section.widgets.items():
            parents = []
            block = widget.parent
            while block is not None:
                parents.append(block)
                block = block.parent
            labels = [getattr(p, "label", None) for p in parents if isinstance(p, gr.Accordion)]
            assert ("Advanced" in labels) == opt.advanced, name


@pytest.mark.parametrize("kind", ["lora", "dreambooth", "finetune", "ti"])
def test_default_values_round_trip_to_build_command(gui, kind, tmp_path):
    tab = tabs(gui)[kind]
    values, accel, family = tab.form.collect(initial_data(tab))
    assert family == "sd1" and values["learning_rate"] == learning_rate(kind, "sd1")
    cmd = build_command(kind, values, accel, str(tmp_path / "job"))
    assert "-m" in cmd.argv and cmd.argv[cmd.argv.index("-m", 3) + 1].startswith("sd_scripts.")
    back = read_back(cmd, tab.trainer, tmp_path)
    expected = normalize_values(kind, values)
    for name in expected:
        if name not in JOB_OPTIONS:
            assert back[name] == expected[name], name


@pytest.mark.parametrize("kind", ["lora", "dreambooth", "finetune", "ti"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_changed_values_round_trip_to_build_command(gui, kind, family, tmp_path):
    """Every option of the family set to a non-default value in its widget arrives unchanged in the run TOML."""
    tab = tabs(gui)[kind]
    data = initial_data(tab)
    data[tab.form.family] = family
    wanted = {}
    for name, (opt, widget) in tab.form.options.items():
        if name in EXCLUSIVE or name in JOB_OPTIONS or family not in opt.families:
            continue
        wanted[name] = sample_value(opt, tab.trainer)
        data[widget] = to_widget_value(opt, wanted[name])
    data[tab.form.prompts] = "a photo of sks dog --w 64 --h 64\n"
    values, accel, chosen = tab.form.collect(data)
    assert chosen == family and set(values) >= set(wanted)
    assert all(family in schema.BY_NAME[k].families for k in values if k in schema.BY_NAME)
    cmd = build_command(kind, values, accel, str(tmp_path / "job"))
    back = read_back(cmd, tab.trainer, tmp_path)
    for name, value in wanted.items():
        if name == "sample_prompts":
            assert back[name] == cmd.prompts_path  # the prompts typed in the tab win over a prompt file
            continue
        assert back[name] == value, name
    assert cmd.prompts_text.startswith("a photo of sks dog")


def test_hidden_family_options_are_not_sent(gui):
    tab = tabs(gui)["lora"]
    data = initial_data(tab)
    data[tab.form.widget("v2")] = True
    values, _, _ = tab.form.collect(data)
    assert "v2" not in values  # sd1 is selected: the SD2-only flag never reaches the trainer
    data[tab.form.family] = "sd2"
    assert tab.form.collect(data)[0]["v2"] is True


def test_accelerate_settings_round_trip(gui, tmp_path):
    tab = tabs(gui)["lora"]
    data = initial_data(tab)
    widgets = tab.form.accelerate.widgets
    data[widgets["num_processes"]] = 2
    data[widgets["multi_gpu"]] = True
    data[widgets["gpu_ids"]] = "0,1"
    data[widgets["mixed_precision"]] = "bf16"
    data[widgets["extra_args"]] = "--rdzv_backend static"
    values, accel, _ = tab.form.collect(data)
    assert accel.num_processes == 2 and accel.multi_gpu and accel.extra_args == ["--rdzv_backend", "static"]
    argv = build_command("lora", values, accel, str(tmp_path)).argv
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv
    assert argv[argv.index("--mixed_precision") + 1] == "bf16" and argv[argv.index("--gpu_ids") + 1] == "0,1"
    flat = tab.form.accelerate.flat(accel)
    assert flat["accelerate.num_processes"] == 2 and "accelerate.machine_rank" not in flat
    shown = tab.form.accelerate.updates(flat)
    assert shown[widgets["num_processes"]] == 2 and shown[widgets["extra_args"]] == "--rdzv_backend static"
    for widget, value in shown.items():  # every value must pass the widget's own postprocessing
        widget.postprocess(value)


def test_family_change_moves_defaults_and_visibility(gui):
    tab = tabs(gui)["dreambooth"]
    form = tab.form
    data = initial_data(tab)
    data[form.family] = "sdxl"
    updates = form.family_changed(data, "sd1")
    assert updates[form.widget("learning_rate")]["value"] == learning_rate("dreambooth", "sdxl")
    assert updates[form.widget("resolution")]["value"] == "1024"
    assert updates[form.widget("v2")]["visible"] is False
    assert updates[form.widget("network_dim") if "network_dim" in form.options else form.widget("seed")][
        "visible"] is True
    data[form.widget("learning_rate")] = 3e-6  # the user's own value stays
    updates = form.family_changed(data, "sd1")
    assert "value" not in updates[form.widget("learning_rate")]
    data[form.family] = "sd2"
    assert form.family_changed(data, "sd1")[form.widget("v2")]["visible"] is True


def test_every_family_has_a_learning_rate_for_every_kind():
    from sd_scripts.families import all_families

    for kind in ("lora", "dreambooth", "finetune", "ti"):
        for family, spec in all_families().items():
            if {"lora": "network", "dreambooth": "db"}.get(kind, kind) in spec.trainers:
                assert learning_rate(kind, family) > 0
    assert learning_rate("lora", "sd1") == 1e-4 and learning_rate("dreambooth", "sdxl") == 1e-5


def test_preset_values_show_and_collect_back(gui):
    tab = tabs(gui)["lora"]
    preset = {"network_dim": 16, "optimizer_args": ["weight_decay=0.1"], "seed": 0, "model_family": "sdxl",
              "sample_prompts_text": "a cat", "accelerate.num_processes": 2, "output_name": "mine"}
    updates = tab.form.updates(preset)
    data = initial_data(tab)
    for widget, update in updates.items():
        data[widget] = update["value"] if isinstance(update, dict) else update
    values, accel, family = tab.form.collect(data)
    assert family == "sdxl" and values["network_dim"] == 16 and values["seed"] == 0
    assert values["optimizer_args"] == ["weight_decay=0.1"] and values["output_name"] == "mine"
    assert values["learning_rate"] == learning_rate("lora", "sdxl") and values["resolution"] == "1024"
    assert values["sample_prompts_text"] == "a cat" and accel.num_processes == 2
    assert values["network_alpha"] == tab.form.base["network_alpha"]  # not in the preset: the tab's default


def test_config_toml_sets_tab_defaults_and_reports_unknown_keys(tmp_path):
    from kohya_gui.gui_config import load_gui_config

    path = tmp_path / "config.toml"
    path.write_text('[folders]\noutput_dir = "/data/out"\n[lora]\nlearning_rate = 3e-4\nnetwork_dimm = 8\n'
                    '[accelerate_launch]\nnum_processes = 2\n[gui]\nstop_grace_s = 5\ndefault_kind = "dreambooth"\n')
    ctx = AppContext(str(tmp_path / "jobs"), load_gui_config(str(path)))
    try:
        assert any("network_dimm" in w for w in ctx.config_warnings)
        assert ctx.jobs.grace_s == 5
        demo = build_app(ctx)
        by_kind = {t.kind: t for t in demo.kohya_tabs}
        lora, db = by_kind["lora"].form, by_kind["dreambooth"].form
        assert lora.widget("learning_rate").value == 3e-4  # explicit: wins over the family table
        assert db.widget("learning_rate").value == learning_rate("dreambooth", "sd1")
        assert lora.widget("output_dir").value == "/data/out" and db.widget("output_dir").value == "/data/out"
        assert lora.accelerate.widgets["num_processes"].value == 2
        assert any(isinstance(b, gr.Markdown) and "network_dimm" in str(b.value) for b in demo.blocks.values())
        assert any(isinstance(b, gr.Tabs) and b.selected == "dreambooth" for b in demo.blocks.values())
    finally:
        ctx.close()


def test_presets_load_save_and_kohya_import(gui, tmp_path, monkeypatch):
    monkeypatch.setenv("KOHYA_GUI_USER_PRESETS", str(tmp_path / "user"))
    tab = tabs(gui)["lora"]
    names = tab.on_load()[0]["choices"]
    assert "SDXL LoRA" in [n if isinstance(n, str) else n[0] for n in names]
    outputs = tab._load_preset("SDXL LoRA")
    shown = dict(zip([*tab.form.outputs, tab.family_state], outputs))
    for widget in tab.form.outputs:  # what the page receives must pass each widget's postprocessing
        update = shown[widget]
        widget.postprocess(update["value"] if isinstance(update, dict) else update)
    assert shown[tab.family_state] == "sdxl" and "Loaded preset" in outputs[-1]
    assert shown[tab.form.widget("network_dim")]["value"] == 32
    data = initial_data(tab)
    for widget in tab.form.outputs:
        update = shown[widget]
        data[widget] = update["value"] if isinstance(update, dict) else update
    data[tab.form.widget("network_dim")] = 24
    data[tab.form.accelerate.widgets["num_processes"]] = 2
    data[tab.preset_name] = "mine"
    choices, message = tab._save_preset(data)
    assert "Saved preset" in message and "mine" in [c if isinstance(c, str) else c[0] for c in choices["choices"]]
    outputs = tab._load_preset("mine")
    shown = dict(zip([*tab.form.outputs, tab.family_state], outputs))
    assert shown[tab.form.widget("network_dim")]["value"] == 24
    assert shown[tab.form.accelerate.widgets["num_processes"]] == 2
    kohya = tmp_path / "kohya.json"
    kohya.write_text('{"LoRA_type": "Standard", "network_dim": 64, "epoch": 3, "sdxl": true, '
                     '"learning_rate": 0.0002, "mystery_key": "x"}')
    outputs = tab._import(str(kohya))
    shown = dict(zip([*tab.form.outputs, tab.family_state], outputs))
    assert shown[tab.form.widget("network_dim")]["value"] == 64 and shown[tab.family_state] == "sdxl"
    assert shown[tab.form.widget("max_train_epochs")]["value"] == "3"
    assert "mystery_key" in outputs[-1]
    assert "Not imported" in tab._import(str(tmp_path / "missing.json"))[-1]


def test_widget_conversions():
    seed, lr, args = schema.BY_NAME["seed"], schema.BY_NAME["learning_rate"], schema.BY_NAME["network_args"]
    assert to_option_value(seed, "") is None and to_option_value(seed, " 0 ") == 0
    with pytest.raises(ValueError, match="seed"):
        to_option_value(seed, "1.5")
    assert to_option_value(lr, 1e-4) == 1e-4
    assert to_option_value(args, "conv_dim=4 'a=b c'") == ["conv_dim=4", "a=b c"]
    assert to_widget_value(args, ["conv_dim=4", "a=b c"]) == "conv_dim=4 'a=b c'"
    sep = schema.BY_NAME["keep_tokens_separator"]
    assert to_option_value(sep, "") == ""  # a str option whose default is '' keeps ''
    warmup = schema.BY_NAME["lr_warmup_steps"]
    assert to_option_value(warmup, 10.0) == 10 and to_option_value(warmup, 0.1) == 0.1


def test_print_command_shows_argv_and_toml(gui):
    tab = tabs(gui)["lora"]
    data = initial_data(tab)
    data[tab.form.widget("network_dim")] = 8
    box, command, toml, panel = tab._print(data)
    assert "sd_scripts.train_network" in command and "--config_file" in command
    assert "network_dim = 8" in toml and panel == ""
    data[tab.form.widget("seed")] = "not a number"
    box, command, toml, panel = tab._print(data)
    assert command == "" and "seed" in panel


def test_start_is_refused_with_preflight_errors(gui):
    ctx, _ = gui
    tab = tabs(gui)["lora"]
    before = len(ctx.jobs.list())
    panel, message, watched = tab._launch_now({**initial_data(tab), tab.watched: None})
    assert "Not started" in message and "kg-error" in panel and watched is None
    assert "pretrained_model_name_or_path" in panel
    assert len(ctx.jobs.list()) == before


def test_tabs_without_trainer_show_notice_and_disable_start(gui, monkeypatch):
    tab = tabs(gui)["dreambooth"]
    real = training.importlib.util.find_spec
    monkeypatch.setattr(training.importlib.util, "find_spec",
                        lambda name: None if name == "sd_scripts.train_db" else real(name))
    presets, notice, start, queue = tab.on_load()
    assert notice["visible"] is True and "not available" in notice["value"]
    assert start["interactive"] is False and queue["interactive"] is False
    panel, message, _ = tab._launch_now({**initial_data(tab), tab.watched: None})
    assert "not available" in message
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: object())  # trainer installed later
    presets, notice, start, queue = tab.on_load()
    assert notice["visible"] is False and start["interactive"] is True


def test_every_event_is_private(gui):
    _, demo = gui
    assert demo.fns and all(fn.api_visibility == "private" for fn in demo.fns.values())


def test_progress_and_status_rendering():
    view = RunView(step=5, total_steps=10, epoch=1, total_epochs=2, it_per_s=2.5, eta_s=2, loss=0.25)
    html = render.progress_html(view, "running")
    assert "step 5 / 10" in html and "50 %" in html and "epoch 1 / 2" in html and "2.50 it/s" in html
    assert "ETA 2s" in html and 'data-percent="50"' in html

    class FakeJob:
        id, name, kind, status, exit_code, job_dir = "j1", "run", "lora", "failed", 3, "/jobs/j1"
        error_message = None

    view.error_message, view.error_hint = "model not found", "check the path"
    text = render.status_markdown(FakeJob(), view)
    assert "failed" in text and "`3`" in text and "model not found" in text and "check the path" in text
    view.loss_points, view.smoothed = [(1, 1.0), (2, 0.5)], [(1, 1.0), (2, 0.95)]
    assert render.loss_rows(view) == [(1, 1.0, "loss"), (2, 0.5, "loss"), (1, 1.0, "smoothed"),
                                      (2, 0.95, "smoothed")]


def test_tensorboard_argv_and_start_stop(tmp_path, monkeypatch):
    argv = tensorboard_argv(str(tmp_path), 6123)
    assert argv[-6:] == ["--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", "6123"]
    seen = {}

    def fake_argv(logdir, port):
        seen["args"] = (logdir, port)
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    monkeypatch.setattr("kohya_gui.tensorboard.tensorboard_argv", fake_argv)
    board = TensorBoard()
    with pytest.raises(ValueError, match="Logging dir"):
        board.start("")
    url = board.start(str(tmp_path / "logs"))
    assert board.running() and url == f"http://127.0.0.1:{seen['args'][1]}/"
    assert os.path.isdir(tmp_path / "logs")
    board.stop()
    assert not board.running() and board.url is None


def test_tensorboard_button_toggles(gui, monkeypatch, tmp_path):
    ctx, _ = gui
    monkeypatch.setattr("kohya_gui.tensorboard.tensorboard_argv",
                        lambda logdir, port: [sys.executable, "-c", "import time; time.sleep(60)"])
    assert "TensorBoard not started" in ctx.toggle_tensorboard("")
    message = ctx.toggle_tensorboard(str(tmp_path / "tb"))
    assert "http://127.0.0.1:" in message and ctx.tensorboard.running()
    assert "stopped" in ctx.toggle_tensorboard(None) and not ctx.tensorboard.running()


def test_monitor_reads_new_events_incrementally(gui, tmp_path):
    ctx, _ = gui

    class FakeJob:
        id, status, error_message, error_hint = "fake-1", "running", None, None
        events_path = str(tmp_path / "events.jsonl")

    with open(FakeJob.events_path, "w") as f:
        f.write('{"type": "start", "total_steps": 4}\n{"type": "progress", "step": 1, "loss": 0.5}\n')
    view = ctx.view(FakeJob())
    assert view.total_steps == 4 and view.step == 1
    with open(FakeJob.events_path, "a") as f:
        f.write('{"type": "progress", "step": 2, "loss": 0.4}\n')
    assert ctx.view(FakeJob()).step == 2 and len(ctx.view(FakeJob()).loss_points) == 2


def test_app_module_never_imports_heavy_libraries(tmp_path):
    import subprocess

    code = ("import sys, kohya_gui.app as a; ctx = a.AppContext(sys.argv[1]); a.build_app(ctx); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "print(bad); ctx.close()")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jobs")],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ticker_settles_jobs_in_background(tmp_path):
    ctx = AppContext(str(tmp_path / "jobs"))
    calls = []
    ctx.jobs.tick = lambda: calls.append(time.monotonic()) or []
    ctx.start_ticker()
    time.sleep(1.3)
    ctx.close()
    assert len(calls) >= 2
    assert app_module.TICK_S <= 1.0


def test_dataset_preparation_fills_the_lora_folders(gui, tmp_path):
    from PIL import Image

    raw, reg = tmp_path / "raw", tmp_path / "reg"
    for folder, n in ((raw, 3), (reg, 2)):
        folder.mkdir()
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(folder / f"{i}.png")
    utilities = gui[1].kohya_utilities
    out = utilities._prepare(str(raw), str(tmp_path / "ds"), "sks", "dog", 10, str(reg), 1, 2)
    summary, filled = out[0], dict(zip(utilities.targets, out[1:]))
    assert "10_sks dog" in summary and "| 3 | 10 | 30 |" in summary
    assert "Steps per epoch** at batch size 2: **30**" in summary  # 30 draws, doubled by reg, / batch 2
    assert filled["train_data_dir"] == str(tmp_path / "ds" / "img")
    assert (tmp_path / "ds" / "img" / "10_sks dog" / "0.png").is_file()
    assert filled["reg_data_dir"] == str(tmp_path / "ds" / "reg")
    assert filled["output_dir"] == str(tmp_path / "ds" / "model")
    bad = utilities._prepare(str(tmp_path / "nope"), str(tmp_path / "ds2"), "sks", "dog", 10, "", 1, 1)
    assert "Not prepared" in bad[0] and all(isinstance(x, type(gr.skip())) for x in bad[1:])


@pytest.mark.parametrize("family, shown, hidden", [
    ("flux", ("clip_l", "t5xxl", "ae", "guidance_scale", "timestep_sampling", "model_prediction_type",
              "blocks_to_swap", "fp8_base"), ("clip_g", "v2", "v_parameterization", "training_shift",
                                              "clip_skip", "max_token_length", "noise_offset", "min_snr_gamma", "vae")),
    ("sd3", ("clip_l", "clip_g", "t5xxl", "weighting_scheme", "training_shift", "t5_dropout_rate"),
     ("ae", "guidance_scale", "timestep_sampling", "v2")),
])
def test_choosing_a_dit_family_shows_its_options_and_defaults(gui, family, shown, hidden, tmp_path):
    from sd_scripts.families import family_spec

    spec = family_spec(family)
    for kind in ("lora", "finetune"):
        tab = tabs(gui)[kind]
        data = initial_data(tab)
        data[tab.form.family] = family
        updates = tab.form.family_changed(data, "sd1")
        assert updates[tab.form.widget("resolution")]["value"] == "1024" == str(spec.default_resolution)
        rate = updates[tab.form.widget("learning_rate")].get("value", data[tab.form.widget("learning_rate")])
        assert rate == spec.learning_rates[tab.trainer] == learning_rate(kind, family)
        for name in shown:
            if name in tab.form.options:
                assert updates[tab.form.widget(name)]["visible"] is True, (kind, name)
        for name in hidden:
            if name in tab.form.options:
                assert updates[tab.form.widget(name)]["visible"] is False, (kind, name)
        for name, (opt, widget) in tab.form.options.items():
            refused = not opt.family_specific and name in spec.refused_options  # e.g. clip_skip for FLUX.1
            assert updates[widget]["visible"] == (family in opt.families and not refused), name
            data[widget] = updates[widget].get("value", data[widget])
        values, accel, chosen = tab.form.collect(data)
        assert chosen == family and values["model_family"] == family
        assert not set(hidden) & set(values)  # other families' options never reach the trainer
        cmd = build_command(kind, values, accel, str(tmp_path / kind))
        assert cmd.argv[cmd.argv.index("--config_file") - 1] == f"sd_scripts.{spec.trainer_scripts[tab.trainer]}"


def test_a_family_without_a_kind_keeps_the_tab_usable_and_preflight_refuses(gui, tmp_path):
    tab = tabs(gui)["dreambooth"]
    data = initial_data(tab)
    data[tab.form.family] = "flux"
    updates = tab.form.family_changed(data, "sd1")
    assert "value" not in updates[tab.form.widget("learning_rate")]  # FLUX.1 has no DreamBooth learning rate
    assert updates[tab.form.widget("resolution")]["value"] == "1024"
    values, accel, family = tab.form.collect(data)
    checks = gui[0].preflight("dreambooth", values, accel, family)
    assert any(c.level == "error" and c.field == "model_family" and "cannot be trained with dreambooth" in c.message
               for c in checks), checks
    data[tab.form.family] = "sd1"
    assert "value" not in tab.form.family_changed(data, "flux")[tab.form.widget("learning_rate")]
