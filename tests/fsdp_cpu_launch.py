"""Test-only launcher: runs one of our trainers with FSDP on the CPU (gloo), which accelerate does not set up.

torch's FSDP (FSDP1 and FSDP2) runs on the CPU over gloo, but accelerate 1.x turns `ACCELERATE_USE_FSDP` (what
`accelerate launch --config_file fsdp.yaml` / `--use_fsdp` sets) into `DistributedType.FSDP` only for GPU /
accelerator processes (`AcceleratorState.__init__`): on CPUs the state stays MULTI_CPU and the trainer refuses the
run (`FSDP_ON_CPU`). Two more CPU-only obstacles follow: accelerate's plugin fails without such a device when
sync_module_states is on (its meta-device init function wants one; `accelerate launch` turns the flag on through
fsdp_cpu_ram_efficient_loading, default true), and accelerate's CPU device is 'cpu:0', which FSDP1 refuses as
`device_id` beside its CPU compute device 'cpu' ("Inconsistent compute device and `device_id`"), and FSDP1's
sync_module_states broadcasts only GPU tensors ("requires them to be on GPU"). For the tests this
module does those steps itself: it builds accelerate's plugin from the same FSDP_* variables, lets accelerate make
its MULTI_CPU state, then sets the distributed type FSDP with that plugin (FSDP1: sync_module_states off) and
the device 'cpu'. Everything after that
(preparing, wrapping, gradients, saving, save_state / load_state) is accelerate's and torch's own code.

Usage: accelerate launch --config_file fsdp.yaml -m fsdp_cpu_launch sd_scripts.train_network ARGS...
(with this folder on PYTHONPATH).
"""
from __future__ import annotations

import os
import runpy
import sys


def _fsdp_on_cpu() -> None:
    import accelerate
    import accelerate.state
    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = accelerate.Accelerator.__init__

    def __init__(self, *args, **kwargs):
        # accelerate's own plugin needs a GPU-like device for sync_module_states' meta-device init function
        # (`param_init_fn`, used only for modules on the meta device; ours are real): build it without and set
        # the flag afterwards.
        # (cpu_ram_efficient_loading, which forces it on, concerns transformers' from_pretrained only)
        saved = {name: os.environ.get(name) for name in ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
        os.environ.update(FSDP_SYNC_MODULE_STATES="false", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
        try:
            plugin = FullyShardedDataParallelPlugin()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        # FSDP1's sync_module_states broadcasts over the GPU only ("requires them to be on GPU"); the processes
        # read the same checkpoint, and the trainer broadcasts the trained weights' initial values itself.
        plugin.sync_module_states = False if plugin.fsdp_version == 1 else plugin.sync_module_states
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # (so that accelerate builds its MULTI_CPU state)
        try:
            original(self, *args, **kwargs)
        finally:
            os.environ["ACCELERATE_USE_FSDP"] = "true"
        state = self.state
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # AcceleratorState() copies PartialState's fields each time it is made: set both. accelerate's CPU device
        # is 'cpu:0', which FSDP1 refuses as device_id next to its CPU compute device 'cpu'.
        for shared in (accelerate.state.PartialState._shared_state, state.__dict__):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")

    accelerate.Accelerator.__init__ = __init__
    from sd_scripts.training import accelerator_setup

    accelerator_setup.fsdp_without_devices = lambda: False  # (the trainer's refusal of exactly this situation)


if __name__ == "__main__":
    _fsdp_on_cpu()
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
