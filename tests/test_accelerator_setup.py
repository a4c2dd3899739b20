"""Scale-out options (training/accelerator_setup.py, training/distributed.py): torch_compile / dynamo_backend,
ddp_timeout / ddp_gradient_as_bucket_view / ddp_static_graph, the DeepSpeed options, FSDP's refusal.

Each option is followed to where it acts: accelerate's handler or plugin objects of a real Accelerator, DeepSpeed's
own config checker, the compiled denoiser of a real (in-process) Trainer, the gradients of a real gloo process group.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from sd_scripts.options import BY_NAME, OptionError, parse_args

pytestmark = pytest.mark.timeout(300)

SCALEOUT = ("torch_compile", "dynamo_backend", "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph",
            "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
            "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients")
DATA = os.path.join(os.path.dirname(__file__), "data", "sd_scripts_options")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (dynamo plugin, distributed type): reset it around a test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


# ---------------------------------------------------------------- the schema: sd-scripts' names and defaults
@pytest.mark.parametrize("script, trainer", [("train_network", "network"), ("train_db", "db"),
                                             ("fine_tune", "finetune"), ("train_textual_inversion", "ti")])
def test_names_defaults_and_choices_are_sd_scripts(script, trainer):
    with open(os.path.join(DATA, f"{script}.json"), encoding="utf-8") as f:
        theirs = json.load(f)["options"]
    defaults = vars(parse_args(trainer, []))
    for name in SCALEOUT:
        assert defaults[name] == theirs[name]["default"], name
        if theirs[name]["choices"]:
            assert set(BY_NAME[name].choices) == set(theirs[name]["choices"]), name


@pytest.mark.parametrize("argv, words", [
    (["--zero_stage", "3"], ["zero_stage", "add 'deepspeed'"]),
    (["--offload_optimizer_device", "cpu"], ["offload_optimizer_device", "deepspeed"]),
    (["--deepspeed", "--offload_param_device", "cpu"], ["offload_param_device", "ZeRO stage 3"]),
    (["--deepspeed", "--zero_stage", "1", "--offload_optimizer_device", "cpu"], ["offload_optimizer_device", "2 or 3"]),
    (["--deepspeed", "--zero_stage", "1", "--offload_param_nvme_path", "/nvme"],
     ["offload_param_nvme_path", "ZeRO stage 3"]),
    (["--deepspeed", "--zero3_save_16bit_model"], ["zero3_save_16bit_model", "ZeRO stage 3"]),
    (["--deepspeed", "--zero_stage", "3", "--zero3_init_flag"], ["zero3_init_flag' is not supported",
                                                                 "deepspeed.zero.Init", "remove it"]),
    (["--deepspeed", "--offload_optimizer_device", "nvme"], ["offload_optimizer_device' nvme needs ZeRO stage 3"]),
    (["--deepspeed", "--fp16_master_weights_and_gradients"], ["fp16_master_weights_and_gradients", "cpu"]),
    (["--ddp_timeout", "0"], ["ddp_timeout"]),
    (["--dynamo_backend", "nope"], ["dynamo_backend"]),
])
def test_bad_combinations_name_the_option(argv, words):
    from sd_scripts.training.accelerator_setup import check_options

    with pytest.raises(OptionError) as e:
        check_options(parse_args("network", argv))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_the_trainer_checks_them_before_loading_anything(tmp_path):
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    args = parse_args("network", ["--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"),
                                  "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                                  "--zero_stage", "3"])
    with pytest.raises(OptionError, match="'zero_stage' is a DeepSpeed setting"):
        Trainer(args, NetworkMethod(args))


# ---------------------------------------------------------------- DDP settings and torch.compile reach the trainer
def _trainer(tiny_sd1, demo_data, out_dir, *options):
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    args = parse_args("network", ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir",
                                  demo_data, "--output_dir", str(out_dir), "--resolution", "64",
                                  "--caption_extension", ".txt", "--cache_latents", "--max_train_steps", "2",
                                  *options])
    trainer = Trainer(args, NetworkMethod(args))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare"):
        getattr(trainer, step)()
    return trainer


def test_ddp_options_and_torch_compile_reach_the_accelerator_and_the_denoiser(tiny_sd1, demo_data, tmp_path,
                                                                             fresh_accelerate_state):
    from accelerate.utils import DynamoBackend

    trainer = _trainer(tiny_sd1, demo_data, tmp_path, "--torch_compile", "--dynamo_backend", "aot_eager",
                       "--ddp_timeout", "7", "--ddp_gradient_as_bucket_view", "--ddp_static_graph")
    acc = trainer.accelerator
    assert acc.init_handler.timeout == datetime.timedelta(minutes=7)
    assert acc.ddp_handler.gradient_as_bucket_view and acc.ddp_handler.static_graph
    assert trainer.gradients.bucket_view and trainer.gradients.static_graph  # what the loop averages with
    assert acc.state.dynamo_plugin.backend == DynamoBackend.AOT_EAGER
    unet = trainer.bundle.denoiser
    assert unet._compiled_call_impl is not None, "the denoiser the family calls is compiled"
    assert set(unet.state_dict()) == set(trainer.bundle.denoiser.state_dict())  # in place: keys unchanged
    assert not any("_orig_mod" in k for k in unet.state_dict())


def test_without_the_options_nothing_is_compiled_or_set(tiny_sd1, demo_data, tmp_path, fresh_accelerate_state):
    trainer = _trainer(tiny_sd1, demo_data, tmp_path)
    assert trainer.bundle.denoiser._compiled_call_impl is None
    assert trainer.accelerator.init_handler is None and trainer.accelerator.ddp_handler is None
    assert not trainer.gradients.bucket_view and not trainer.gradients.static_graph


def test_compile_denoiser_runs_the_module_through_dynamo_with_the_accelerators_settings(fresh_accelerate_state,
                                                                                        monkeypatch):
    """`accelerate launch --dynamo_mode/--dynamo_use_fullgraph` reach torch.compile next to torch_compile's backend."""
    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    from sd_scripts.training.accelerator_setup import accelerator_kwargs, compile_denoiser

    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_FULLGRAPH", "true")
    args = parse_args("network", ["--torch_compile", "--dynamo_backend", "eager"])
    acc = Accelerator(cpu=True, **accelerator_kwargs(args))
    assert acc.state.dynamo_plugin.to_kwargs() == {"backend": "eager", "fullgraph": True}
    module = _Small()
    before = counters["stats"]["unique_graphs"]
    assert compile_denoiser(acc, module)
    x = torch.randn(3, 4)
    torch.testing.assert_close(module(x), module._call_impl(x))
    assert counters["stats"]["unique_graphs"] > before, "the forward went through dynamo"


class _Small(torch.nn.Module):  # a module of ours (torch.nn's own code is skipped by dynamo)
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_an_accelerate_backend_sd_scripts_lists_but_accelerate_lacks_is_an_error():
    from sd_scripts.training.accelerator_setup import dynamo_plugin

    with pytest.raises(OptionError, match="dynamo_backend.*'ipex'"):
        dynamo_plugin(parse_args("network", ["--torch_compile", "--dynamo_backend", "ipex"]))


# ---------------------------------------------------------------- gradient averaging with the DDP settings
@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "rendezvous"), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _backward(model, x):
    model(x).square().sum().backward()


def test_bucket_view_gradients_live_in_the_all_reduce_buffer(gloo_group):
    from accelerate.utils import DistributedDataParallelKwargs

    from sd_scripts.training.distributed import GradientAverager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    averager = GradientAverager(model.parameters(), DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                                bucket_elements=20)
    x = torch.randn(5, 4)
    _backward(model, x)
    averager.average()
    assert len(averager.buckets) >= 2  # split at about bucket_elements
    for flat, params in averager.buckets:
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert all(start <= p.grad.data_ptr() < end for p in params)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)  # what the loop does with bucket views
    _backward(model, x)
    _backward(model, x)  # accumulation goes into the same buffers
    averager.average()
    for flat, params in averager.buckets:
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert all(start <= p.grad.data_ptr() < end for p in params)
    for p, g in zip(model.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g)
    # the same numbers as plain gradients
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p, r in zip(plain.parameters(), reference):
            p.copy_(r)
    _backward(plain, x)
    for p, g in zip(plain.parameters(), first):
        torch.testing.assert_close(p.grad, g)


def test_static_graph_plans_once_and_refuses_a_changed_set(gloo_group):
    from accelerate.utils import DistributedDataParallelKwargs

    from sd_scripts.training.distributed import GradientAverager

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    averager = GradientAverager(model.parameters(), DistributedDataParallelKwargs(static_graph=True))
    x = torch.randn(2, 4)
    _backward(model, x)
    averager.average()
    buffers = [flat.data_ptr() for flat, _ in averager.buckets]
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _backward(model, x)
    averager.average()
    assert [flat.data_ptr() for flat, _ in averager.buckets] == buffers, "the layout is reused"
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)  # world of 1: the average is the gradient, copied back
    model.zero_grad()
    model[0].requires_grad_(False)
    _backward(model, x)
    with pytest.raises(RuntimeError, match="ddp_static_graph"):
        averager.average()


# ---------------------------------------------------------------- DeepSpeed
def _deepspeed_args(*extra):
    return parse_args("network", ["--deepspeed", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                                  "--max_grad_norm", "0.5", *extra])


def test_deepspeed_plugin_carries_every_option_and_deepspeed_accepts_the_config(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from sd_scripts.training.accelerator_setup import deepspeed_plugin

    plugin = deepspeed_plugin(_deepspeed_args(
        "--zero_stage", "3", "--offload_optimizer_device", "nvme", "--offload_optimizer_nvme_path", str(tmp_path),
        "--offload_param_device", "cpu", "--zero3_init_flag", "--zero3_save_16bit_model", "--mixed_precision", "bf16"))
    config = plugin.deepspeed_config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and plugin.zero3_init_flag
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": str(tmp_path)}
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["train_batch_size"] == 6
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True
    checked = DeepSpeedConfig(json.loads(json.dumps(config)))  # DeepSpeed's own parser and batch-size check
    assert checked.zero_optimization_stage == 3 and checked.train_batch_size == 6
    assert checked.zero_config.offload_param.device == "cpu"
    assert checked.zero_config.offload_optimizer.device == "nvme"
    assert checked.gradient_clipping == 0.5 and checked.bfloat16_config.enabled


def test_deepspeed_fp16_master_weights_reach_the_config():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from sd_scripts.training.accelerator_setup import deepspeed_plugin

    config = deepspeed_plugin(_deepspeed_args("--zero_stage", "2", "--offload_optimizer_device", "cpu",
                                              "--mixed_precision", "fp16",
                                              "--fp16_master_weights_and_gradients")).deepspeed_config
    assert config["fp16"]["enabled"] is True and config["fp16"]["fp16_master_weights_and_grads"] is True
    assert config["fp16"]["initial_scale_power"] == 0
    checked = DeepSpeedConfig(json.loads(json.dumps(config)))
    fp16 = checked.float16_config
    assert fp16.enabled and fp16.fp16_master_weights_and_grads and fp16.initial_scale_power == 0
    assert checked.zero_optimization_stage == 2
    assert checked.zero_config.offload_optimizer.device == "cpu"


def test_missing_deepspeed_package_is_an_error_naming_it(monkeypatch):
    from sd_scripts.training.accelerator_setup import deepspeed_plugin

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` sees when it is not installed
    with pytest.raises(OptionError, match="option 'deepspeed' needs the deepspeed package.*pip install deepspeed"):
        deepspeed_plugin(_deepspeed_args())
    assert deepspeed_plugin(parse_args("network", [])) is None


def test_deepspeed_zero2_lora_run_on_the_cpu(tmp_path, tiny_sd1, demo_data):
    """A real one-process DeepSpeed run (DeepSpeed's CPU accelerator, gloo): the engine gets the plugin's settings,
    steps the LoRA and the file is saved."""
    pytest.importorskip("deepspeed")
    import subprocess

    from safetensors.torch import load_file

    from conftest import PYTHON, REPO, subprocess_env
    from sd_scripts.training.events import read_events

    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "-m", "sd_scripts.train_network", "--pretrained_model_name_or_path", tiny_sd1.single_file,
           "--train_data_dir", demo_data, "--output_dir", str(out), "--output_name", "ds", "--resolution", "64",
           "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "2",
           "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--cache_latents", "--deepspeed",
           "--zero_stage", "2", "--events_file", str(events_file)]
    env = subprocess_env()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DeepSpeed engine: ZeRO stage 2, micro batch 1, gradient accumulation 2, clipping 0.5" in proc.stderr
    events = read_events(str(events_file))
    assert events[-1]["status"] == "completed" and events[-1]["step"] == 2
    tensors = load_file(str(out / "ds.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k), "the engine stepped the LoRA"


# ---------------------------------------------------------------- FSDP (from an accelerate config file)
def test_fsdp_without_gpus_is_refused_with_the_reason(tmp_path, monkeypatch, fresh_accelerate_state):
    """`accelerate launch --config_file fsdp.yaml` (distributed_type: FSDP) sets ACCELERATE_USE_FSDP for the
    process; accelerate 1.x sets FSDP up only for GPU / accelerator processes (without them its plugin raises, or
    the run silently becomes plain data parallel), so the trainer refuses it first, naming what to use instead.
    (FSDP itself runs on the trainers: tests/test_sharding.py.)"""
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = parse_args("network", ["--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"),
                                  "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    trainer = Trainer(args, NetworkMethod(args))
    with pytest.raises(OptionError, match="FSDP .* needs GPUs.*--multi_gpu"):
        trainer.setup_accelerator()


def test_deepspeed_or_processes_that_accelerate_did_not_set_up_are_errors(monkeypatch, fresh_accelerate_state):
    """Never a silent fallback: `--deepspeed` on an accelerator that is not DeepSpeed (e.g. several processes on
    CPUs, where accelerate sets up MULTI_CPU), or launched processes that each came up alone."""
    from accelerate import Accelerator

    from sd_scripts.training.accelerator_setup import check_distributed_type

    acc = Accelerator(cpu=True)
    check_distributed_type(acc, parse_args("network", []))
    with pytest.raises(OptionError, match="option 'deepspeed': accelerate set the run up as NO, not DeepSpeed"):
        check_distributed_type(acc, parse_args("network", ["--deepspeed"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OptionError, match="2 processes were launched but accelerate set each up as 1"):
        check_distributed_type(acc, parse_args("network", []))
