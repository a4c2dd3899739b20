"""fp8 base weights (`--fp8_base`, `--fp8_base_unet`): frozen Linear / Conv / Embedding weights stored in
float8_e4m3fn and computed in the run's mixed precision (bf16 / fp16), upcast one layer at a time at forward time.

The library does the job: diffusers' layerwise casting hooks (`diffusers.hooks.apply_layerwise_casting`) cast each
supported layer to the compute dtype just before its forward and back to the storage dtype after it; works on any
torch module (diffusers models and transformers text encoders alike). What this module adds is the policy:
- which layers stay in the compute dtype: the input / output projections and positional tables diffusers keeps by
  default (its "norm" pattern is dropped here, because in DiTs it also matches the adaptive-norm modulation Linears,
  a quarter of FLUX.1's weights; real norm layers are not cast by the hooks anyway), plus the modules a transformers
  model asks to keep in higher precision (`_keep_in_fp32_modules`, e.g. T5's `wo`, whose caller casts its input to
  the weight's dtype before the layer runs);
- the up-front checks: a torch with float8, mixed precision, and a device that can hold float8 tensors.

Casting back after the forward re-rounds an fp8 value upcast to bf16 / fp16, which is exact, so the stored weights
never drift. Trained adapters (LoRA) are separate modules and stay float32. The upcast copy of a layer's weight is
what the backward pass uses; with gradient checkpointing those copies live one block at a time, which is where the
memory is saved (as with sd-scripts, whose fp8 relies on autocast doing the same upcast).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..options import OptionError

log = logging.getLogger(__name__)

FP8_DTYPE_NAME = "float8_e4m3fn"
#: diffusers' default keep-list without its "norm" pattern (see the module docstring)
KEEP_PATTERNS = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$")


def fp8_dtype() -> torch.dtype:
    """torch.float8_e4m3fn; OptionError naming the options when this torch has no float8 dtype."""
    dtype = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise OptionError(f"options 'fp8_base' / 'fp8_base_unet' need PyTorch 2.1 or newer (float8 storage); this is "
                          f"torch {torch.__version__}: upgrade torch or remove the option")
    return dtype


def check_fp8_device(device: torch.device | str, compute_dtype: torch.dtype) -> None:
    """OptionError when `device` cannot store float8 tensors or cast them to `compute_dtype` (e.g. Apple MPS)."""
    dtype = fp8_dtype()
    device = torch.device(device)
    try:
        probe = torch.ones(4, device=device, dtype=compute_dtype).to(dtype).to(compute_dtype)
        ok = bool((probe == 1).all())
    except (RuntimeError, TypeError, NotImplementedError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise OptionError(f"options 'fp8_base' / 'fp8_base_unet': the {device.type} device cannot store float8 "
                          f"weights ({reason}); remove the option or train on a CUDA GPU") from None
    if not ok:
        raise OptionError(f"options 'fp8_base' / 'fp8_base_unet': float8 round trip fails on the {device.type} "
                          f"device; remove the option")


def keep_patterns(module: nn.Module) -> tuple[str, ...]:
    """The module-name patterns whose layers stay in the compute dtype for `module`."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return KEEP_PATTERNS + tuple(rf"(^|\.){name}$" for name in keep)


def store_in_fp8(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store `module`'s Linear / Conv / Embedding weights in float8, computed in `compute_dtype`; returns how many
    layers were converted. Call once, before adapters (LoRA) wrap the layers' forwards."""
    from diffusers.hooks import apply_layerwise_casting

    dtype = fp8_dtype()
    apply_layerwise_casting(module, storage_dtype=dtype, compute_dtype=compute_dtype,
                            skip_modules_pattern=keep_patterns(module))
    layers = sum(1 for m in module.modules() if _stored_in(m, dtype))
    log.info("fp8: %d layers of %s stored in %s, computed in %s", layers, type(module).__name__, FP8_DTYPE_NAME,
             str(compute_dtype).replace("torch.", ""))
    return layers


def _stored_in(module: nn.Module, dtype: torch.dtype) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == dtype


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters as stored now."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
