"""The allow-list of extra `accelerate launch` arguments: accelerate's own tuning options, each value checked.

Extra arguments come from the form, a preset or an imported kohya_ss config (`extra_accelerate_launch_args`) and are
placed before `-m <trainer>`. Anything that changes WHAT accelerate runs (`--no_python`, `-m`, a positional script,
`--main_training_function`, TPU/remote launchers, host files) would let a file run programs, so only the options
listed here pass; settings the form has a field for must be set there. The names were taken from
`accelerate launch --help` (accelerate 1.x).
"""
from __future__ import annotations

import os
import re
from typing import Callable

Checker = Callable[[str], str | None]  # value -> None when fine, else what is wrong

FIELD = "accelerate.extra_args"


def _choice(*allowed: str) -> Checker:
    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    return check


def _int(minimum: int) -> Checker:
    def check(value: str) -> str | None:
        return None if re.fullmatch(r"\d{1,9}", value) and int(value) >= minimum else \
            f"must be a whole number of at least {minimum}"
    return check


def _positive_float(value: str) -> str | None:
    try:
        ok = float(value) > 0 and re.fullmatch(r"[0-9.eE+-]{1,32}", value) is not None
    except ValueError:
        ok = False
    return None if ok else "must be a positive number"


def _bool_text(value: str) -> str | None:
    return None if value.lower() in ("true", "false") else "must be true or false"


def _class_names(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*", value) else \
        "must be Python class names separated by commas"


def _json_file(value: str) -> str | None:
    if not value.endswith(".json"):
        return "must be a DeepSpeed .json config file"
    return None if os.path.isfile(value) else f"{value!r} does not exist"


#: Options without a value.
FLAGS = frozenset({
    "--quiet", "--debug", "--enable_cpu_affinity", "--same_network", "--dynamo_use_fullgraph",
    "--dynamo_use_dynamic", "--dynamo_use_regional_compilation", "--use_deepspeed", "--use_fsdp",
    "--fp8_use_autocast_during_eval",
})
#: Options with one value, and how that value is checked.
VALUED: dict[str, Checker] = {
    "--dynamo_mode": _choice("default", "reduce-overhead", "max-autotune"),
    "--rdzv_backend": _choice("static", "c10d", "etcd", "etcd-v2"),
    "--max_restarts": _int(0),
    "--monitor_interval": _positive_float,
    "--deepspeed_config_file": _json_file,
    "--zero_stage": _choice("0", "1", "2", "3"),
    "--offload_optimizer_device": _choice("none", "cpu", "nvme"),
    "--offload_param_device": _choice("none", "cpu", "nvme"),
    "--gradient_accumulation_steps": _int(1),
    "--gradient_clipping": _positive_float,
    "--zero3_init_flag": _bool_text,
    "--zero3_save_16bit_model": _bool_text,
    "--fsdp_version": _choice("1", "2"),
    "--fsdp_offload_params": _bool_text,
    "--fsdp_min_num_params": _int(0),
    "--fsdp_sharding_strategy": _choice("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                                        "HYBRID_SHARD_ZERO2", "1", "2", "3", "4", "5"),
    "--fsdp_reshard_after_forward": _bool_text,
    "--fsdp_auto_wrap_policy": _choice("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"),
    "--fsdp_transformer_layer_cls_to_wrap": _class_names,
    "--fsdp_backward_prefetch": _choice("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"),
    "--fsdp_state_dict_type": _choice("FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"),
    "--fsdp_forward_prefetch": _bool_text,
    "--fsdp_use_orig_params": _bool_text,
    "--fsdp_cpu_ram_efficient_loading": _bool_text,
    "--fsdp_sync_module_states": _bool_text,
    "--fsdp_activation_checkpointing": _bool_text,
    "--fp8_backend": _choice("ao", "te", "msamp"),
}
#: Options the form has a field for (accelerate.<field>): set there, so the value is checked and shown once.
FORM_FIELDS = {
    "--config_file": "config_file", "--cpu": "cpu", "--multi_gpu": "multi_gpu", "--mixed_precision":
    "mixed_precision", "--num_processes": "num_processes", "--num_machines": "num_machines",
    "--num_cpu_threads_per_process": "num_cpu_threads_per_process", "--dynamo_backend": "dynamo_backend",
    "--gpu_ids": "gpu_ids", "--machine_rank": "machine_rank", "--main_process_ip": "main_process_ip",
    "--main_process_port": "main_process_port",
}
#: Options refused because they change what runs or where (named in the message).
CHANGES_WHAT_RUNS = {
    "-m": "makes accelerate run another module", "--module": "makes accelerate run another module",
    "--no_python": "makes accelerate run any program instead of Python",
    "--main_training_function": "changes the function accelerate calls",
    "--tpu": "starts a TPU launcher", "--tpu_cluster": "starts commands on TPU VMs",
    "--tpu_use_sudo": "runs commands with sudo", "--vm": "starts commands on other machines",
    "--env": "sets environment variables of remote machines",
    "--deepspeed_hostfile": "starts commands on other machines over ssh",
    "--deepspeed_multinode_launcher": "starts commands on other machines",
    "--mpirun_hostfile": "starts commands on other machines over mpirun",
    "-t": "writes files outside the job folder", "--tee": "writes files outside the job folder",
    "--log_dir": "writes files outside the job folder",
}
SHORT = {"-q": "--quiet"}


class ExtraArgsError(ValueError):
    """An extra accelerate argument that is not allowed; the message says which and why."""


def _canonical(name: str) -> str:
    name = SHORT.get(name, name)
    return "--" + name[2:].replace("-", "_") if name.startswith("--") else name


def check_extra_args(items: list[str]) -> list[str]:
    """The extra arguments, checked against the allow-list and normalised (`--opt=value` -> `--opt value`,
    dashes -> underscores). ExtraArgsError names the first argument that is refused and why."""
    out: list[str] = []
    i = 0
    while i < len(items):
        item = items[i]
        if not isinstance(item, str):
            raise ExtraArgsError(f"{item!r} is not text")
        if any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise ExtraArgsError(f"{item!r} contains a control character")
        if not item.startswith("-"):
            raise ExtraArgsError(f"{item!r} is a positional argument: it would change the script accelerate runs; "
                                 f"remove it")
        name, has_inline, inline = item.partition("=")
        name = _canonical(name)
        if name in CHANGES_WHAT_RUNS:
            raise ExtraArgsError(f"{item!r} is refused: it {CHANGES_WHAT_RUNS[name]}; remove it")
        if name in FORM_FIELDS:
            raise ExtraArgsError(f"{item!r}: set it in the field accelerate.{FORM_FIELDS[name]} instead")
        if name in FLAGS:
            if has_inline:
                raise ExtraArgsError(f"{item!r}: {name} takes no value")
            out.append(name)
            i += 1
            continue
        checker = VALUED.get(name)
        if checker is None:
            raise ExtraArgsError(f"{item!r} is not an accelerate launch option the GUI passes on; allowed: "
                                 f"{', '.join(sorted(FLAGS | set(VALUED)))}")
        if has_inline:
            value = inline
        elif i + 1 < len(items) and isinstance(items[i + 1], str):
            value = items[i + 1]
            i += 1
        else:
            raise ExtraArgsError(f"{name} needs a value")
        problem = "must not start with '-'" if value.startswith("-") else checker(value)
        if problem:
            raise ExtraArgsError(f"{name} {value!r}: {problem}")
        out += [name, value]
        i += 1
    return out
