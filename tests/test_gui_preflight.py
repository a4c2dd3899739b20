"""kohya_gui.preflight: every check is a clear message naming its field."""
import json
import os
import struct
import sys

from kohya_gui import preflight
from kohya_gui.command import AccelerateSettings
from kohya_gui.preflight import GpuInfo, has_errors, run_preflight

SMI = """name, compute_cap, memory.total [MiB], memory.free [MiB]
NVIDIA GeForce GTX 1080 Ti, 6.1, 11264 MiB, 10000 MiB
NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB, 80000 MiB
"""


def _model(tmp_path, family="sd1"):
    key = {"sd1": "cond_stage_model.transformer.x", "sd2": "cond_stage_model.model.token_embedding.weight",
           "sdxl": "conditioner.embedders.1.model.x"}[family]
    header = json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / f"{family}.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    return str(path)


def _dataset(tmp_path, concepts={"10_sks dog": 3, "5_ohwx cat": 2}):
    root = tmp_path / "img"
    for name, n in concepts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(b"png")
            if i:
                (root / name / f"{i}.txt").write_text("caption")
    return root


def _values(tmp_path, **kw):
    values = {"pretrained_model_name_or_path": _model(tmp_path), "train_data_dir": str(_dataset(tmp_path)),
              "output_dir": str(tmp_path / "out" / "deep"), "logging_dir": str(tmp_path / "logs"),
              "caption_extension": ".txt", "max_train_steps": 100}
    values.update(kw)
    return values


def _run(kind, values, accel=None, gpus=(), **kw):
    return run_preflight(kind, values, accel or AccelerateSettings(), gpu_probe=lambda: list(gpus),
                         check_trainer=kw.pop("check_trainer", False), **kw)


def _find(checks, field, level=None, text=""):
    return [c for c in checks if c.field == field and (level is None or c.level == level) and text in c.message]


def test_good_lora_setup_counts_images_and_steps_and_creates_output_dirs(tmp_path):
    checks = _run("lora", _values(tmp_path, train_batch_size=2))
    assert not has_errors(checks), checks
    assert os.path.isdir(tmp_path / "out" / "deep") and os.path.isdir(tmp_path / "logs")
    assert _find(checks, "train_data_dir", "info", "'10_sks dog': 3 images x 10")
    assert _find(checks, "train_data_dir", "info", "= 40 image draws per epoch")
    assert _find(checks, "max_train_steps", "info", "20 steps per epoch; 100 steps in total (5 epochs)")
    assert _find(checks, "caption_extension", "info", "1 of 3 images in '10_sks dog' have no '.txt' caption")
    assert _find(checks, "pretrained_model_name_or_path", "info", "model family: sd1")


def test_epochs_regularisation_and_processes_change_the_steps(tmp_path):
    reg = tmp_path / "reg"
    (reg / "1_dog").mkdir(parents=True)
    (reg / "1_dog" / "a.png").write_bytes(b"x")
    checks = _run("dreambooth", _values(tmp_path, reg_data_dir=str(reg), max_train_epochs=3))
    assert _find(checks, "max_train_steps", "info", "80 steps per epoch; 240 steps in total (3 epochs)")
    assert preflight.steps_plan(40, 0, 1, 2, 2, 100, None) == (10, 100, 10)


def test_folder_rule_mistakes(tmp_path):
    concept = _dataset(tmp_path) / "10_sks dog"
    checks = _run("lora", _values(tmp_path, train_data_dir=str(concept)))
    assert _find(checks, "train_data_dir", "error", "is a concept folder itself: set train_data_dir to its parent")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(b"x")
    (loose / "no_repeats").mkdir()
    (loose / "0_zero").mkdir()
    checks = _run("lora", _values(tmp_path, train_data_dir=str(loose)))
    assert _find(checks, "train_data_dir", "error", "holds images directly")
    assert _find(checks, "train_data_dir", "warning", "no_repeats is ignored") and \
        _find(checks, "train_data_dir", "warning", "0_zero is ignored")
    empty = tmp_path / "empty"
    (empty / "3_x").mkdir(parents=True)
    checks = _run("lora", _values(tmp_path, train_data_dir=str(empty)))
    assert _find(checks, "train_data_dir", "error", "has no images")


def test_missing_paths_unwritable_output_and_path_like_output_name(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    checks = _run("lora", _values(tmp_path, pretrained_model_name_or_path=str(tmp_path / "nope.safetensors"),
                                  vae=str(tmp_path / "nope_vae"), output_dir=str(blocker / "sub"),
                                  output_name="../x"))
    assert _find(checks, "pretrained_model_name_or_path", "error", "does not exist")
    assert _find(checks, "vae", "error", "does not exist")
    assert _find(checks, "output_dir", "error", "cannot be created or written")
    assert _find(checks, "output_name", "error", "not a path")
    checks = _run("lora", _values(tmp_path, pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5"))
    assert _find(checks, "pretrained_model_name_or_path", "warning", "hub id")


def test_cpu_precision_messages(tmp_path):
    assert _find(_run("lora", _values(tmp_path)), "mixed_precision", "info", "'no' (fp32) works on the CPU")
    assert _find(_run("lora", _values(tmp_path, mixed_precision="fp16")), "mixed_precision", "error", "needs a GPU")
    checks = _run("lora", _values(tmp_path), AccelerateSettings(mixed_precision="bf16"))
    assert _find(checks, "mixed_precision", "warning", "bf16 on the CPU works but is slow")
    checks = _run("lora", _values(tmp_path), AccelerateSettings(num_processes=2))
    assert _find(checks, "accelerate.num_processes", "info", "data parallel over gloo")  # the trainer does CPU DDP
    assert not _find(checks, "accelerate.num_processes", "error")


def test_fine_tune_counts_images_listed_in_in_json_times_repeats(tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"0": {"caption": "a"}, str(folder / "1.png"): {"caption": "b"}, "9": {"tags": "c"}}))
    values = _values(tmp_path, train_data_dir=str(folder), in_json=str(meta), dataset_repeats=3,
                     max_train_steps=None, max_train_epochs=2)
    checks = _run("finetune", values)
    assert _find(checks, "train_data_dir", "info", "2 images x 3 repeats = 6 image draws")
    assert _find(checks, "max_train_steps", "info", "6 steps per epoch; 12 steps in total")


def test_gpu_probe_table_precision_and_counts(tmp_path):
    gpus = preflight.parse_nvidia_smi(SMI)
    assert gpus[0] == GpuInfo(0, "NVIDIA GeForce GTX 1080 Ti", 6.1, 11264.0, 10000.0)
    assert preflight.parse_nvidia_smi("A100, 8.0, 81920, 80000\n")[0].compute_cap == 8.0  # noheader,nounits
    pascal = AccelerateSettings(gpu_ids="0")
    assert _find(_run("lora", _values(tmp_path, mixed_precision="bf16"), pascal, gpus), "mixed_precision", "error",
                 "needs compute capability 8.0+; the GPU has 6.1")
    assert _find(_run("lora", _values(tmp_path, mixed_precision="fp16"), pascal, gpus), "mixed_precision", "warning")
    ampere = AccelerateSettings(gpu_ids="1")
    assert not _find(_run("lora", _values(tmp_path, mixed_precision="bf16"), ampere, gpus), "mixed_precision",
                     "error")
    checks = _run("lora", _values(tmp_path), AccelerateSettings(num_processes=3, multi_gpu=True), gpus)
    assert _find(checks, "accelerate.num_processes", "error", "3 processes on this machine need 3 GPUs; 2")
    checks = _run("lora", _values(tmp_path, mixed_precision="fp16"), AccelerateSettings(num_processes=2), gpus)
    assert _find(checks, "accelerate.multi_gpu", "warning")


def test_memory_estimate_against_free_memory(tmp_path):
    small = [GpuInfo(0, "small", 8.6, 4096, 3000)]
    checks = _run("finetune", _values(tmp_path, mixed_precision="fp16", pretrained_model_name_or_path=_model(
        tmp_path, "sdxl"), resolution="1024", train_data_dir=str(tmp_path / "img")), gpus=small)
    assert _find(checks, "train_batch_size", "warning", "only 2.9 GB free GPU memory")
    lora = preflight.estimate_memory_gb("network", "sd1", {"resolution": "512", "mixed_precision": "fp16"})
    full = preflight.estimate_memory_gb("db", "sdxl", {"resolution": "1024", "mixed_precision": "fp16"})
    assert 2 < lora < 8 and full > 30
    assert preflight.estimate_memory_gb("network", "sd1", {"resolution": "512", "mixed_precision": "fp16",
                                                          "gradient_checkpointing": True}) < lora


def test_family_detection_and_options_that_do_not_apply(tmp_path):
    assert preflight.detect_family(_model(tmp_path, "sdxl")) == "sdxl"
    assert preflight.detect_family(_model(tmp_path, "sd2")) == "sd2"
    diffusers = tmp_path / "diff"
    for part, config in (("unet", {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}),
                         ("text_encoder", {}), ("text_encoder_2", {})):
        (diffusers / part).mkdir(parents=True)
        (diffusers / part / "config.json").write_text(json.dumps(config))
    (diffusers / "model_index.json").write_text(json.dumps({"text_encoder_2": ["x"]}))
    assert preflight.detect_family(str(diffusers)) == "sdxl"
    checks = _run("lora", _values(tmp_path, pretrained_model_name_or_path=_model(tmp_path, "sdxl"), v2=True,
                                  resolution="1024"))
    assert _find(checks, "v2", "error", "option 'v2' is for Stable Diffusion 2.x models")  # the trainer refuses it
    assert not _find(checks, "resolution", "warning")
    checks = _run("lora", _values(tmp_path, resolution="1024"), family="sd1")
    assert not _find(checks, "resolution", "warning")
    assert _find(_run("lora", _values(tmp_path, resolution="2048")), "resolution", "warning")


def test_command_field_errors_and_sampling_without_prompts(tmp_path):
    checks = _run("lora", _values(tmp_path, output_name="a\nb"))
    assert checks[0].level == "error" and checks[0].field == "output_name"
    checks = _run("lora", _values(tmp_path, sample_every_n_steps=10))
    assert _find(checks, "sample_prompts_text", "warning", "no prompts")


def test_trainer_importable_uses_the_jobs_python(tmp_path):
    # the test environment is a working one: every trainer is found, and a launch is not refused
    for trainer in preflight.TRAINER_MODULES:
        assert preflight.trainer_importable(trainer, sys.executable) is None, trainer
    assert not _find(_run("lora", _values(tmp_path), python=sys.executable, check_trainer=True), "trainer")
    assert "cannot import sd_scripts.not_there" in _fake_module_check()
    assert "cannot run" in preflight.trainer_importable("network", str(tmp_path / "no-python"))
    checks = _run("lora", _values(tmp_path), python=str(tmp_path / "no-python"), check_trainer=True)
    assert _find(checks, "trainer", "error", "cannot run")


def _fake_module_check():
    saved = dict(preflight.TRAINER_MODULES)
    preflight.TRAINER_MODULES["network"] = "sd_scripts.not_there"
    try:
        return preflight.trainer_importable("network", sys.executable)
    finally:
        preflight.TRAINER_MODULES.clear()
        preflight.TRAINER_MODULES.update(saved)


# ------------------------------------------------------------------ FLUX.1 / SD3: kinds, refusals, part files

def _flux_values(tmp_path, **kw):
    parts = {}
    for part in ("clip_l", "t5xxl", "ae"):
        parts[part] = str(tmp_path / f"{part}.safetensors")
        open(parts[part], "wb").close()
    values = _values(tmp_path, pretrained_model_name_or_path=str(tmp_path / "flux1-dev.safetensors"),
                     resolution="1024", network_module="networks.lora_flux", **parts)
    open(values["pretrained_model_name_or_path"], "wb").close()
    values.update(kw)
    return values


def test_kinds_a_family_does_not_have_are_refused_with_the_tabs_to_use(tmp_path):
    from sd_scripts.families import family_spec

    for family in ("flux", "sd3"):
        assert "db" not in family_spec(family).trainers and "ti" not in family_spec(family).trainers
        for kind in ("dreambooth", "ti"):
            values = _values(tmp_path, resolution="1024")
            checks = _run(kind, values, family=family)
            found = _find(checks, "model_family", "error", "cannot be trained with " + kind)
            assert found and "use the lora or finetune tab" in found[0].message, checks
        assert not _find(_run("lora", _flux_values(tmp_path), family=family), "model_family", "error")


def test_flux_part_files_must_exist_and_refused_options_are_errors(tmp_path):
    good = _run("lora", _flux_values(tmp_path), family="flux")
    assert not has_errors(good), [c for c in good if c.level == "error"]
    missing = _run("lora", _flux_values(tmp_path, t5xxl=str(tmp_path / "nope" / "t5xxl.safetensors")),
                   family="flux")
    assert _find(missing, "t5xxl", "error", "does not exist")
    refused = _run("lora", _flux_values(tmp_path, noise_offset=0.05), family="flux")
    assert _find(refused, "noise_offset", "error", "cannot be used with FLUX.1 models")
    assert not _find(refused, "noise_offset", "warning")  # one message per problem
    other = _run("lora", _flux_values(tmp_path, clip_g=str(tmp_path / "clip_l.safetensors")), family="flux")
    assert _find(other, "clip_g", "error", "is for Stable Diffusion 3")
    sd3 = _run("lora", _flux_values(tmp_path, clip_g=str(tmp_path / "nope.safetensors"), ae=None,
                                    network_module="networks.lora_sd3"), family="sd3")
    assert _find(sd3, "clip_g", "error", "does not exist")


def test_accelerate_config_file_must_exist_and_fsdp_without_gpus_is_refused_before_launch(tmp_path):
    values = _values(tmp_path)
    checks = _run("lora", values, AccelerateSettings(config_file=str(tmp_path / "missing.yaml")))
    assert _find(checks, "accelerate.config_file", "error", "does not exist")
    odd = tmp_path / "fsdp.txt"
    odd.write_text("distributed_type: FSDP\n")
    assert _find(_run("lora", values, AccelerateSettings(config_file=str(odd))), "accelerate.config_file", "error",
                 ".yaml")
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
                    "  fsdp_sharding_strategy: FULL_SHARD\nnum_processes: 2\n")
    refused = _find(_run("lora", values, AccelerateSettings(config_file=str(fsdp))), "accelerate.config_file",
                    "error", "FSDP")
    assert refused and "needs GPUs" in refused[0].message and "--multi_gpu" in refused[0].message
    assert _find(_run("lora", values, AccelerateSettings(extra_args=["--use_fsdp"])), "accelerate.extra_args",
                 "error", "FSDP")
    gpu = GpuInfo(0, "NVIDIA H100", 9.0, 81559, 80000)
    with_gpu = _run("lora", values, AccelerateSettings(config_file=str(fsdp)), gpus=[gpu])
    assert not _find(with_gpu, "accelerate.config_file", "error")
    assert _find(with_gpu, "accelerate.config_file", "info", "sharded")
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert not _find(_run("lora", values, AccelerateSettings(config_file=str(ddp))), "accelerate.config_file",
                     "error")
