"""Sharded training (training/sharding.py): FSDP from an accelerate config file and DeepSpeed ZeRO-3, end to end.

- FSDP: real `accelerate launch --config_file fsdp.yaml` runs of two processes on the CPU (gloo), through
  `tests/fsdp_cpu_launch.py`, which does the one thing accelerate refuses to do without GPUs (set its state up as
  FSDP; the obstacles are listed there). The FSDP1 LoRA must equal, bit for bit, the data-parallel run of the same
  seed (which averages gradients by all-reduce), and reach its validations; an FSDP2 run resumed from the FSDP1
  run's sharded state must end where the straight data-parallel run ends.
- ZeRO-3: a one-process DeepSpeed ZeRO-3 run on the CPU with the golden SD1 run's options must train the LoRA the
  plain trainer trained (tests/data/golden/sd1_lora.safetensors; DeepSpeed sums and clips in its own order, so
  close, not bit-equal), and write DeepSpeed's partitioned checkpoint and consolidated weights as its state.
  (A ZeRO-3 run resumed from that state ends where the straight run ends, exactly; it is left out of the suite
  for time: the resume path is accelerate's load_state, tested here with FSDP.)
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, accelerate_cmd, subprocess_env
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(600)

FSDP1_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
fsdp_config:
  fsdp_version: {version}
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_offload_params: false
"""


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _lora_args(tiny_sd1, demo_data, out, events_file, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
            "--output_dir", str(out), "--output_name", "lora", "--resolution", "64", "--caption_extension", ".txt",
            "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "4", "--cache_latents",
            "--max_grad_norm", "0.5", "--seed", "3", "--validation_split", "0.3", "--validate_every_n_steps", "2",
            "--max_validation_steps", "2", "--events_file", str(events_file), *extra]


def _fsdp_cmd(config_file, *trainer_args) -> list[str]:
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_cpu_threads_per_process", "1", "-m", "fsdp_cpu_launch", "sd_scripts.train_network",
            *trainer_args]


def _fsdp_env() -> dict:
    env = subprocess_env()
    env["PYTHONPATH"] = os.path.join(REPO, "tests") + os.pathsep + env["PYTHONPATH"]
    return env


def _max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_sd1, demo_data):
    """The reference: two data-parallel processes on the CPU, same seed and data."""
    root = tmp_path_factory.mktemp("ddp")
    _run(accelerate_cmd(*_lora_args(tiny_sd1, demo_data, root / "out", root / "events.jsonl"), num_processes=2))
    return load_file(str(root / "out" / "lora.safetensors")), read_events(str(root / "events.jsonl"))


@pytest.fixture(scope="module")
def fsdp1_run(tmp_path_factory, tiny_sd1, demo_data):
    """FSDP1 from an accelerate config file (transformer-based wrapping of the classes the model lists), saving
    its state at step 2."""
    root = tmp_path_factory.mktemp("fsdp1")
    config = root / "fsdp1.yaml"
    config.write_text(FSDP1_CONFIG.format(version=1))
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --s 2 --d 5\n")
    proc = _run(_fsdp_cmd(config, *_lora_args(tiny_sd1, demo_data, root / "out", root / "events.jsonl",
                                              "--save_every_n_steps", "2", "--save_state", "--sample_prompts",
                                              str(prompts), "--sample_every_n_steps", "4")), env=_fsdp_env())
    return root, proc, read_events(str(root / "events.jsonl"))


def test_fsdp1_lora_equals_the_data_parallel_run(fsdp1_run, ddp_run):
    root, proc, events = fsdp1_run
    reference, _ = ddp_run
    assert "sharded model (FSDP1, 2 processes, FullyShardedDataParallel)" in proc.stderr
    assert events[0]["num_processes"] == 2 and events[-1]["status"] == "completed"
    made = load_file(str(root / "out" / "lora.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in made.items() if "lora_up" in k), "the LoRA was trained"
    # full weights were gathered for the file: every tensor has its whole shape and equals the DDP run's
    assert _max_difference(made, reference) == 0.0
    # validation under sharding: every process scores every batch (its forward passes are collective), so the
    # run reaches each validation (the latents of held-out images are drawn per process, so the losses are not
    # the data-parallel run's, where each process scores its share)
    ours = [(e["kind"], e["step"], e["batches"]) for e in events if e["type"] == "validation"]
    assert ours == [(k, s, 2) for k, s in [("step", 2), ("step", 4), ("epoch", 4)]]
    assert all(0 < e["loss"] < 10 for e in events if e["type"] == "validation")
    state = root / "out" / "lora-step00000002-state"
    assert (state / "pytorch_model_fsdp_0").is_dir() and (state / "optimizer_0").is_dir()  # sharded checkpoint
    # sampling: both processes run the pipeline (the weights are gathered collectively), the main one writes
    samples = [e for e in events if e["type"] == "sample"]
    assert len(samples) == 1 and len(samples[0]["paths"]) == 1 and os.path.isfile(samples[0]["paths"][0])
    assert len(list((root / "out" / "sample").iterdir())) == 1


def test_fsdp2_resumes_the_fsdp1_state_and_ends_where_the_straight_run_ends(fsdp1_run, ddp_run, tmp_path,
                                                                            tiny_sd1, demo_data):
    root, _, _ = fsdp1_run
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP1_CONFIG.format(version=2))
    state = root / "out" / "lora-step00000002-state"
    proc = _run(_fsdp_cmd(config, *_lora_args(tiny_sd1, demo_data, tmp_path / "out", tmp_path / "events.jsonl",
                                              "--resume", str(state))), env=_fsdp_env())
    assert "sharded model (FSDP2, 2 processes, FSDPShardedModel)" in proc.stderr
    assert "resumed from" in proc.stderr
    events = read_events(str(tmp_path / "events.jsonl"))
    assert [e["step"] for e in events if e["type"] == "progress"][0] == 3  # it went on from step 2
    made = load_file(str(tmp_path / "out" / "lora.safetensors"))
    reference, _ = ddp_run
    # FSDP2 reduce-scatters in another order than the all-reduce: equal up to float rounding
    assert _max_difference(made, reference) < 1e-6
    step2 = load_file(str(root / "out" / "lora-step00000002.safetensors"))
    assert _max_difference(made, step2) > 1e-4  # (it trained after the resume)


# ---------------------------------------------------------------- DeepSpeed ZeRO-3
def _zero3_run(tmp_path, *extra) -> subprocess.CompletedProcess:
    from sd_scripts.options import dump_toml
    from sd_scripts.tools.tiny_model import build_tiny_model, make_demo_dataset
    from test_family_move_golden import RUNS

    family, v_pred, options = RUNS["sd1_lora"]
    model = build_tiny_model(str(tmp_path / "model"), family=family, v_prediction=v_pred, layout="single",
                             seed=0).single_file
    data = make_demo_dataset(str(tmp_path / "data"), seed=0)
    values = dict(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(tmp_path / "out"),
                  output_name="z3", resolution="64", network_dim=4, network_alpha=2.0, learning_rate=1e-3,
                  max_train_steps=3, caption_extension=".txt", cache_latents=True, seed=7,
                  save_model_as="safetensors", deepspeed=True, zero_stage=3, **options)
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(values, "network"))
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "-m", "sd_scripts.train_network", "--config_file", str(config), *extra]
    env = subprocess_env()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return _run(cmd, env)


def test_zero3_lora_trains_what_the_plain_trainer_trains(tmp_path):
    pytest.importorskip("deepspeed")  # optional (not in requirements); FSDP needs only torch and accelerate
    golden = load_file(os.path.join(REPO, "tests", "data", "golden", "sd1_lora.safetensors"))
    first = tmp_path / "first"
    proc = _zero3_run(first, "--save_every_n_steps", "2", "--save_state", "--zero3_save_16bit_model")
    assert "sharded model (DeepSpeed ZeRO stage 3, DeepSpeedEngine)" in proc.stderr
    assert "DeepSpeed engine: ZeRO stage 3" in proc.stderr
    made = load_file(str(first / "out" / "z3.safetensors"))
    # text-encoder LoRA (CLIP's position table registered with its parent) and LoCon conv layers included
    assert any(k.startswith("lora_te_") for k in made) and any("conv" in k for k in made)
    assert _max_difference(made, golden) < 2e-5  # (DeepSpeed clips at max_grad_norm 0.01 by its own norm sum)
    assert max(t.abs().max().item() for k, t in made.items() if "lora_up" in k) > 1e-4  # (trained)
    state = first / "out" / "z3-step00000002-state"
    assert (state / "pytorch_model").is_dir()  # DeepSpeed's partitioned checkpoint
    # zero3_save_16bit_model: DeepSpeed's consolidated weights of the whole sharded model beside it, full shapes
    consolidated = torch.load(state / "zero3_16bit_model.bin", weights_only=True)
    step2 = load_file(str(first / "out" / "z3-step00000002.safetensors"))
    ups = {k: v for k, v in consolidated.items() if k.startswith("trained.") and k.endswith("lora_up.weight")}
    assert len(ups) == len([k for k in step2 if k.endswith("lora_up.weight")])
    assert any(k.startswith("denoiser.") and v.numel() > 0 for k, v in consolidated.items())
    assert sorted(v.abs().sum().item() for v in ups.values()) == pytest.approx(
        sorted(v.abs().sum().item() for k, v in step2.items() if k.endswith("lora_up.weight")))


# ---------------------------------------------------------------- the pieces, in-process
class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class _Denoiser(torch.nn.Module):
    _no_split_modules = ["_Block", "NotInThisModel"]

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _Network(torch.nn.Module):
    """LoRA modules on the denoiser's layers, held apart from it (as networks/lora.py does)."""

    def __init__(self, denoiser):
        super().__init__()
        from sd_scripts.networks.lora_module import LoRAModule

        self.loras = torch.nn.ModuleList([LoRAModule(f"lora_{i}", b.proj, rank=2) for i, b in
                                          enumerate(denoiser.blocks)])
        for lora in self.loras:
            lora.apply_to()


def test_sharded_model_holds_each_part_once_and_lists_only_block_classes_it_has():
    from sd_scripts.training.sharding import ShardedModel, adapted_layers

    denoiser = _Denoiser()
    network = _Network(denoiser)
    wrapper = ShardedModel(denoiser, [], network)
    assert wrapper.trained is network  # a LoRA's weights live outside the denoiser
    assert wrapper._no_split_modules == ["_Block"]  # (a class the model does not contain would stop accelerate)
    full = ShardedModel(denoiser, [], denoiser)  # full fine-tuning: the trained module is the denoiser
    assert not hasattr(full, "trained")
    assert len(list(full.parameters())) == len(list(denoiser.parameters()))
    assert adapted_layers(network.loras[0]) == [denoiser.blocks[0].proj]
    x = torch.randn(3, 8)
    assert torch.equal(wrapper(denoiser, x), denoiser(x))  # forward runs the given call

    class _LycorisLike(torch.nn.Module):  # lycoris-lora keeps its layer in a one-element list
        def __init__(self, layer):
            super().__init__()
            self.org_module = [layer]

    assert adapted_layers(_LycorisLike(denoiser.blocks[1].proj)) == [denoiser.blocks[1].proj]
    assert adapted_layers(denoiser.blocks[0]) == []


@pytest.mark.parametrize("argv, words", [
    (["--blocks_to_swap", "2"], ["'blocks_to_swap'", "cannot be used with FSDP / DeepSpeed ZeRO-3"]),
    (["--torch_compile"], ["'torch_compile'", "ZeRO stage 2"]),
    (["--scale_weight_norms", "1.0"], ["'scale_weight_norms'", "only its shard"]),
])
def test_what_a_sharded_run_cannot_do_is_refused_by_name(argv, words):
    from sd_scripts.options import OptionError, parse_args
    from sd_scripts.training.methods import NetworkMethod
    from sd_scripts.training.sharding import check_sharded_run

    args = parse_args("network", argv)
    with pytest.raises(OptionError) as e:
        check_sharded_run(args, NetworkMethod(args))
    assert all(w in str(e.value) for w in words), str(e.value)
    check_sharded_run(parse_args("network", []), NetworkMethod(parse_args("network", [])))  # plain LoRA: fine


def test_textual_inversion_is_not_sharded():
    from sd_scripts.options import OptionError, parse_args
    from sd_scripts.training.sharding import check_sharded_run
    from sd_scripts.training.ti_method import TextualInversionMethod

    args = parse_args("ti", ["--token_string", "sks", "--init_word", "dog"])
    with pytest.raises(OptionError, match="textual inversion .* nothing worth sharding"):
        check_sharded_run(args, TextualInversionMethod(args))


def test_an_fsdp_unit_inside_the_network_is_refused(tmp_path):
    """A size-based wrap policy small enough to make the LoRA network an FSDP unit of its own: its forward never
    runs as a call (the patched layer's does), so its weights would stay sharded. Refused, naming the policy."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from sd_scripts.options import OptionError
    from sd_scripts.training.sharding import ShardedModel, check_fsdp_units

    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "rendezvous"), rank=0, world_size=1)
    try:
        denoiser = _Denoiser()
        network = _Network(denoiser)
        good = FullyShardedDataParallel(ShardedModel(denoiser, [], network), use_orig_params=True,
                                        auto_wrap_policy=ModuleWrapPolicy({_Block}), device_id=torch.device("cpu"))
        check_fsdp_units(good, good.module.trained)
        denoiser = _Denoiser()
        network = _Network(denoiser)
        bad = FullyShardedDataParallel(ShardedModel(denoiser, [], network), use_orig_params=True,
                                       auto_wrap_policy=ModuleWrapPolicy({_Network}), device_id=torch.device("cpu"))
        with pytest.raises(OptionError, match=r"FSDP unit\(s\) inside the trained _Network.*TRANSFORMER_BASED_WRAP"):
            check_fsdp_units(bad, bad.module.trained)
    finally:
        dist.destroy_process_group()
