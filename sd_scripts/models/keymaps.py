"""Key maps between the original single-file (LDM) layout and the diffusers/transformers module layouts.

One table per component, built from the diffusers module's own parameter names, serves both directions, so that
single file -> modules -> single file gives back every tensor bit for bit:

- U-Net: `model.diffusion_model.input_blocks.N.M...` <-> `down_blocks.B.resnets.J...` etc.
- VAE: `first_stage_model.encoder.down.N.block.M...` <-> `encoder.down_blocks.N.resnets.M...`; the mid-block attention
  projections are 1x1 convs in LDM and Linear layers in diffusers (reshape, no copy).
- SD1 text encoder: `cond_stage_model.transformer.text_model.*` is the transformers CLIP layout itself.
- SD2 text encoder: `cond_stage_model.model.*` is the OpenCLIP layout; its fused `attn.in_proj_weight/bias` is split
  into q/k/v.
- SDXL: the U-Net adds `label_emb.0.{0,2}` (diffusers `add_embedding.linear_{1,2}`, the size/crop conditioning) and
  deeper transformer stacks; text encoder 1 is CLIP-L under `conditioner.embedders.0.transformer.text_model.*`, text
  encoder 2 OpenCLIP-bigG under `conditioner.embedders.1.model.*`, whose `text_projection` [width, proj] is the
  transpose of transformers' `text_projection.weight`.
Keys without a rule (SD2's last OpenCLIP layer and text_projection, logit_scale, position ids, EMA weights, schedule
buffers) are not the business of this module: the loader keeps them aside and writes them back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from .ldm_layout import CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, VAE_PREFIX

COPY, CONV1X1, SPLIT, TRANSPOSE = "copy", "conv1x1", "split", "transpose"


@dataclass(frozen=True)
class KeyRule:
    """One single-file tensor and the diffusers tensor(s) it becomes.

    kind: 'copy' (same tensor), 'conv1x1' (LDM [o, i, 1, 1] <-> diffusers [o, i]), 'split' (LDM tensor is the
    concatenation of the diffusers tensors along dim 0, in order) or 'transpose' (a matrix stored as x @ W in LDM and
    as a Linear weight in diffusers).
    """

    ldm: str
    diffusers: tuple[str, ...]
    kind: str = COPY

    def to_diffusers(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == SPLIT:
            # clone: separate storages, so the modules can later be saved with safetensors
            return [part.clone() for part in tensor.chunk(len(self.diffusers), dim=0)]
        if self.kind == CONV1X1 and tensor.ndim == 4:
            return [tensor.reshape(tensor.shape[0], tensor.shape[1])]
        if self.kind == TRANSPOSE:
            return [tensor.t().contiguous()]
        return [tensor]

    def to_ldm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == SPLIT:
            return torch.cat(tensors, dim=0)
        if self.kind == CONV1X1 and tensors[0].ndim == 2:
            return tensors[0].reshape(*tensors[0].shape, 1, 1)
        if self.kind == TRANSPOSE:
            return tensors[0].t()
        return tensors[0]


@dataclass
class KeyMap:
    """The rules of one component; converts in both directions."""

    rules: list[KeyRule] = field(default_factory=list)

    @property
    def ldm_keys(self) -> list[str]:
        return [r.ldm for r in self.rules]

    @property
    def diffusers_keys(self) -> list[str]:
        return [k for r in self.rules for k in r.diffusers]

    def with_ldm_prefix(self, old: str, new: str) -> "KeyMap":
        """The same map with the single-file prefix `old` replaced by `new` (e.g. a VAE file without
        'first_stage_model.')."""
        return KeyMap([KeyRule(new + r.ldm[len(old):] if r.ldm.startswith(old) else r.ldm, r.diffusers, r.kind)
                       for r in self.rules])

    def to_diffusers(self, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusers state dict from `get(ldm_key)` (called once per key, so lazy readers read each tensor once)."""
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            for name, tensor in zip(rule.diffusers, rule.to_diffusers(get(rule.ldm))):
                out[name] = tensor
        return out

    def to_ldm(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Single-file tensors from a diffusers state dict."""
        return {rule.ldm: rule.to_ldm([state_dict[k] for k in rule.diffusers]) for rule in self.rules}


def _rules_from_names(names: Iterable[str], name_fn: Callable[[str], tuple[str, str]]) -> KeyMap:
    """Build rules from diffusers names; name_fn(name) -> (ldm key, kind). Names sharing an ldm key form a split
    rule in the order they were given."""
    grouped: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for name in names:
        ldm, kind = name_fn(name)
        grouped.setdefault(ldm, []).append(name)
        kinds[ldm] = kind
    return KeyMap([KeyRule(ldm, tuple(parts), SPLIT if len(parts) > 1 else kinds[ldm])
                   for ldm, parts in grouped.items()])


# ---------------------------------------------------------------- U-Net

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's size/crop conditioning ('text_time' addition embedding)
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_tail(tail: str) -> str:
    module, _, param = tail.rpartition(".")
    return f"{_UNET_RESNET[module]}.{param}"


def unet_keymap(names: Iterable[str], layers_per_block: int) -> KeyMap:
    """Map of an SD1/SD2/SDXL UNet2DConditionModel whose state-dict keys are `names`."""
    names = list(names)
    per_down = layers_per_block + 1  # resnets (+ attentions) and one downsampler slot per down block
    up_attn = {int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))}

    def name_fn(name: str) -> tuple[str, str]:
        for head, ldm in _UNET_TOP.items():
            if name.startswith(head + "."):
                return UNET_PREFIX + ldm + name[len(head):], COPY
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            b, kind, j, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + b * per_down + j
            if kind == "resnets":
                return f"{UNET_PREFIX}input_blocks.{index}.0.{_resnet_tail(tail)}", COPY
            return f"{UNET_PREFIX}input_blocks.{index}.1.{tail}", COPY
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
            return f"{UNET_PREFIX}input_blocks.{(int(m.group(1)) + 1) * per_down}.0.op.{m.group(2)}", COPY
        if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            kind, j, tail = m.group(1), int(m.group(2)), m.group(3)
            if kind == "attentions":
                return f"{UNET_PREFIX}middle_block.1.{tail}", COPY
            return f"{UNET_PREFIX}middle_block.{2 * j}.{_resnet_tail(tail)}", COPY
        if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            b, kind, j, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = b * per_down + j
            if kind == "resnets":
                return f"{UNET_PREFIX}output_blocks.{index}.0.{_resnet_tail(tail)}", COPY
            return f"{UNET_PREFIX}output_blocks.{index}.1.{tail}", COPY
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
            b = int(m.group(1))
            slot = 2 if b in up_attn else 1
            return f"{UNET_PREFIX}output_blocks.{b * per_down + layers_per_block}.{slot}.conv.{m.group(2)}", COPY
        raise KeyError(f"no single-file name for U-Net parameter {name!r}")

    return _rules_from_names(names, name_fn)


# ---------------------------------------------------------------- VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet_tail(tail: str) -> str:
    return tail.replace("conv_shortcut.", "nin_shortcut.")


def vae_keymap(names: Iterable[str], num_blocks: int) -> KeyMap:
    """Map of an AutoencoderKL with `num_blocks` encoder/decoder blocks whose state-dict keys are `names`."""

    def name_fn(name: str) -> tuple[str, str]:
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name):
            part, module, param = m.groups()
            kind = CONV1X1 if module != "group_norm" else COPY
            return f"{VAE_PREFIX}{part}.mid.attn_1.{_VAE_ATTN[module]}.{param}", kind
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
            part, j, tail = m.group(1), int(m.group(2)), m.group(3)
            return f"{VAE_PREFIX}{part}.mid.block_{j + 1}.{_vae_resnet_tail(tail)}", COPY
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            return f"{VAE_PREFIX}encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet_tail(m.group(3))}", COPY
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
            return f"{VAE_PREFIX}encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}", COPY
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            level = num_blocks - 1 - int(m.group(1))
            return f"{VAE_PREFIX}decoder.up.{level}.block.{m.group(2)}.{_vae_resnet_tail(m.group(3))}", COPY
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
            level = num_blocks - 1 - int(m.group(1))
            return f"{VAE_PREFIX}decoder.up.{level}.upsample.conv.{m.group(2)}", COPY
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
            return f"{VAE_PREFIX}{m.group(1)}.norm_out.{m.group(2)}", COPY
        if re.match(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.", name):
            return VAE_PREFIX + name, COPY
        raise KeyError(f"no single-file name for VAE parameter {name!r}")

    return _rules_from_names(names, name_fn)


# ---------------------------------------------------------------- text encoders


def _without_text_model(name: str) -> str:
    # transformers >= 5 names CLIPTextModel parameters without the 'text_model.' level that single files keep
    return name[len("text_model."):] if name.startswith("text_model.") else name


def clip_keymap(names: Iterable[str], prefix: str = CLIP_PREFIX + "text_model.") -> KeyMap:
    """SD1: the single file holds the transformers CLIP text model under `prefix`."""
    return _rules_from_names(names, lambda n: (prefix + _without_text_model(n), COPY))


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def openclip_keymap(names: Iterable[str], prefix: str = OPENCLIP_PREFIX) -> KeyMap:
    """OpenCLIP text tower under `prefix` (SD2: 'cond_stage_model.model.', SDXL text encoder 2:
    'conditioner.embedders.1.model.'); q/k/v are one fused in_proj tensor there, and a projection is transposed."""
    names = sorted(names, key=lambda n: ("q_proj" not in n, "k_proj" not in n, n))  # q, k, v order for splits

    def name_fn(name: str) -> tuple[str, str]:
        short = _without_text_model(name)
        if short in _OPENCLIP_TOP:
            return prefix + _OPENCLIP_TOP[short], COPY
        if short == "text_projection.weight":  # CLIPTextModelWithProjection
            return prefix + "text_projection", TRANSPOSE
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", short)
        if not m:
            raise KeyError(f"no single-file name for text-encoder parameter {name!r}")
        layer, module, param = m.groups()
        base = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"{base}attn.in_proj_{param}", SPLIT
        return f"{base}{_OPENCLIP_LAYER[module]}.{param}", COPY

    return _rules_from_names(names, name_fn)
