"""What the scale-out options give the Accelerator: torch.compile, process-group / DDP settings, DeepSpeed, FSDP.

Everything goes through accelerate's own objects (TorchDynamoPlugin, InitProcessGroupKwargs,
DistributedDataParallelKwargs, DeepSpeedPlugin), built from sd-scripts' option names; multi-GPU, multi-node and
FSDP settings come from `accelerate launch` and its config file. `accelerator_kwargs(args)` is what
`RunSetup.setup_accelerator` passes on; `check_distributed_type` refuses what the trainer cannot honour;
`compile_denoiser` compiles the denoiser in place with the accelerator's dynamo settings.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
from typing import TYPE_CHECKING

from ..options import OptionError

if TYPE_CHECKING:
    import torch

# torch-free at import: the GUI's pre-flight shows FSDP_ON_CPU for an FSDP accelerate config on a machine without
# GPUs before launching.
FSDP_ON_CPU = ("FSDP (the accelerate config's distributed_type: FSDP, or --use_fsdp) needs GPUs: accelerate sets FSDP "
               "up only for GPU / accelerator processes, and without GPUs it would silently run the config as plain "
               "data parallel. Use 'accelerate launch --multi_gpu --num_processes N' for data parallel on the CPU")

log = logging.getLogger("sd_scripts.train")

DEEPSPEED_STAGES = {  # DeepSpeed setting -> the ZeRO stages that have it (sd-scripts' help texts)
    "zero_stage": (0, 1, 2, 3), "offload_optimizer_device": (2, 3), "offload_optimizer_nvme_path": (3,),
    "offload_param_device": (3,), "offload_param_nvme_path": (3,), "zero3_init_flag": (3,),
    "zero3_save_16bit_model": (3,), "fp16_master_weights_and_gradients": (2,),
}
NVME_PATH_OF = {"offload_optimizer_nvme_path": "offload_optimizer_device",
                "offload_param_nvme_path": "offload_param_device"}
ZERO3_INIT_REFUSED = ("option 'zero3_init_flag' is not supported: it makes transformers build models inside "
                      "deepspeed.zero.Init, but these trainers read a checkpoint into the whole model (memory-mapped) "
                      "and ZeRO-3 partitions it when training starts, so the flag would change nothing; remove it")


def check_options(args: argparse.Namespace) -> None:
    """Before any heavy work: DeepSpeed settings need `deepspeed` and a ZeRO stage that has them; an NVMe path
    needs its device set to nvme; fp16 master weights need ZeRO-Offload under fp16. One error naming them all."""
    from ..options import BY_NAME

    errors = []
    if args.deepspeed and args.zero_stage == 3 and args.zero3_init_flag:
        errors.append(ZERO3_INIT_REFUSED)
    for name, stages in DEEPSPEED_STAGES.items():
        value = getattr(args, name)
        if value in (None, False) or value == BY_NAME[name].default:
            continue
        if not args.deepspeed:
            errors.append(f"option '{name}' is a DeepSpeed setting: add 'deepspeed' (or remove it)")
        elif args.zero_stage not in stages:
            errors.append(f"option '{name}' applies to ZeRO stage {' or '.join(map(str, stages))} only; "
                          f"'zero_stage' is {args.zero_stage}")
        elif name == "offload_optimizer_device" and value == "nvme" and args.zero_stage != 3:
            errors.append(f"option '{name}' nvme needs ZeRO stage 3 (DeepSpeed offloads to NVMe only there); use "
                          "cpu")
        elif name in NVME_PATH_OF and getattr(args, NVME_PATH_OF[name]) != "nvme":
            errors.append(f"option '{name}' is used only with '{NVME_PATH_OF[name]}' nvme")
        elif name == "fp16_master_weights_and_gradients" and (
                args.offload_optimizer_device != "cpu" or args.mixed_precision != "fp16"):
            errors.append(f"option '{name}': DeepSpeed keeps fp16 master weights only with "
                          "'offload_optimizer_device' cpu (ZeRO-Offload) and 'mixed_precision' fp16")
    if errors:
        raise OptionError("; ".join(errors))


def fsdp_without_devices() -> bool:
    """An FSDP launch (ACCELERATE_USE_FSDP, set by `accelerate launch` from an FSDP config or --use_fsdp) on a
    machine without GPUs / accelerators: accelerate would fail building its FSDP plugin, or run plain data
    parallel."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    from accelerate.utils import is_cuda_available, is_hpu_available, is_mlu_available, is_musa_available, \
        is_npu_available, is_xpu_available

    return not any(found() for found in (is_cuda_available, is_xpu_available, is_npu_available, is_mlu_available,
                                         is_musa_available, is_hpu_available))


def accelerator_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for `Accelerator(...)` from the scale-out options (empty when none is set)."""
    if fsdp_without_devices():
        raise OptionError(FSDP_ON_CPU)
    out: dict = {}
    handlers = kwargs_handlers(args)
    if handlers:
        out["kwargs_handlers"] = handlers
    if args.torch_compile:
        out["dynamo_plugin"] = dynamo_plugin(args)
    if args.deepspeed:
        single_process_rendezvous()
        out["deepspeed_plugin"] = deepspeed_plugin(args)
    return out


def kwargs_handlers(args: argparse.Namespace) -> list:
    """ddp_timeout -> InitProcessGroupKwargs; ddp_gradient_as_bucket_view / ddp_static_graph ->
    DistributedDataParallelKwargs (read back by training/distributed.py's gradient averaging)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = []
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                      static_graph=args.ddp_static_graph))
    return handlers


def dynamo_plugin(args: argparse.Namespace):
    """torch_compile + dynamo_backend -> accelerate's TorchDynamoPlugin (mode, fullgraph and dynamic still come from
    `accelerate launch --dynamo_mode / --dynamo_use_fullgraph / --dynamo_use_dynamic`)."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    name = args.dynamo_backend.upper()
    if name not in DynamoBackend.__members__:
        known = ", ".join(b.lower() for b in DynamoBackend.__members__ if b != "NO")
        raise OptionError(f"option 'dynamo_backend': {args.dynamo_backend!r} is not a torch.compile backend "
                          f"accelerate knows ({known}); inductor is the usual choice")
    return TorchDynamoPlugin(backend=name)


def deepspeed_plugin(args: argparse.Namespace):
    """deepspeed + zero_stage + offload options -> accelerate's DeepSpeedPlugin with a complete config (batch sizes
    and precision filled in); None without `deepspeed`. Needs the deepspeed package."""
    if not args.deepspeed:
        return None
    try:
        import deepspeed  # noqa: F401 - accelerate needs it to run the plugin
    except ImportError as e:
        raise OptionError(f"option 'deepspeed' needs the deepspeed package ({e}): install it with "
                          "`pip install deepspeed` (DS_BUILD_OPS=0 to skip building its CUDA ops)") from None
    from accelerate import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=args.max_grad_norm or None,
        offload_optimizer_device=args.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=args.offload_optimizer_nvme_path,
        offload_param_device=args.offload_param_device or "none",
        offload_param_nvme_path=args.offload_param_nvme_path,
        zero3_init_flag=args.zero3_init_flag, zero3_save_16bit_model=args.zero3_save_16bit_model)
    config = plugin.deepspeed_config
    if not args.max_grad_norm:
        config.pop("gradient_clipping", None)
    # Our data loader yields whole batches (batch_size=1 to torch), so accelerate cannot infer these.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * world
    plugin.set_mixed_precision(args.mixed_precision)
    if args.mixed_precision == "fp16":
        config["fp16"]["initial_scale_power"] = 0  # start the loss scale at 1: no overflowing first steps
        if args.fp16_master_weights_and_gradients:
            config["fp16"]["fp16_master_weights_and_grads"] = True
    return plugin


def single_process_rendezvous() -> None:
    """DeepSpeed always runs in a process group; a plain one-process `accelerate launch` sets no rendezvous, so give
    it a local one (what `accelerate launch --use_deepspeed` / torchrun would set)."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def check_distributed_type(accelerator, args: argparse.Namespace) -> None:
    """Refuse what accelerate was asked for but this trainer cannot honour (named, with what to use instead), and a
    `deepspeed` that accelerate did not set up (never train without it silently)."""
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:  # e.g. each process alone: N separate runs
        raise OptionError(f"{world} processes were launched but accelerate set each up as {accelerator.num_processes} "
                          f"({accelerator.distributed_type.value}); check the accelerate settings")
    if args.deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise OptionError(f"option 'deepspeed': accelerate set the run up as {accelerator.distributed_type.value}, "
                          "not DeepSpeed (several DeepSpeed processes need GPUs; one process also runs on the CPU)")

    # accelerate sets DistributedType.FSDP only on GPUs/accelerators; on CPUs an FSDP config would silently run as
    # plain data parallel, so the launcher's flag is checked too.
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        raise OptionError(FSDP_ON_CPU)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3 and plugin.zero3_init_flag:  # from an accelerate config file
        raise OptionError(ZERO3_INIT_REFUSED)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def compile_denoiser(accelerator, denoiser: torch.nn.Module) -> bool:
    """torch.compile the denoiser in place (Module.compile: same object, same state_dict keys, so saving and the
    family's calls are unchanged) when the accelerator's dynamo backend is set, by `torch_compile` or by
    `accelerate launch --dynamo_backend`. Returns whether it did."""
    from accelerate.utils import DynamoBackend

    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return False
    kwargs = plugin.to_kwargs()
    denoiser.compile(**kwargs)
    log.info("torch.compile of the denoiser: %s", ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())))
    return True
