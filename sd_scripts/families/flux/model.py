"""FLUX.1 (dev, schnell) and Chroma on the shared loop: loading the part files, T5/CLIP conditioning, the
flow-matching step, the transformer call, LoRA names and the sample pipeline.

Conditioning (as sd-scripts 48d368f `strategy_flux` computes it, and diffusers' FluxPipeline / ChromaPipeline):
- T5-XXL final hidden states of the caption padded to `t5xxl_max_token_length` tokens (default 256 for schnell, 512
  otherwise), with the tokenizer's attention mask given to T5 when `apply_t5_attn_mask` (Chroma: always, as its
  pipeline does); the same mask hides padding keys in every attention of the denoiser.
- FLUX.1 only: CLIP-L's pooled output (final layer at the EOS token) of the caption in 77 tokens.
The step (training/flow_matching.py): noise first, then sigmas from `timestep_sampling`; noisy = (1 - s) x0 + s n,
target n - x0; the denoiser sees the noisy latents packed 2x2 into 64-channel tokens with (0, row, col) position ids,
text position ids 0, timestep s (diffusers multiplies it by 1000), the guidance embedding `guidance_scale` (dev);
its output is unpacked and `model_prediction_type` applied (sigma_scaled: an x0 estimate pred * -s + noisy, loss
weights of `weighting_scheme`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import ModelLoadError
from ...networks.network_args import flag
from ...networks.targets import T5_CLASSES, TEXT_ENCODER_CLASSES
from ...training import flow_matching as fm
from ...training.loss import LOSS_OPTIONS, LossSettings
from ..base import Family, NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from ..flow_step import FlowMatchingNoise
from . import CHROMA, FLUX, layout

log = logging.getLogger(__name__)

CLIP_LENGTH = 77
TE_CACHE_SUFFIX = "_flux_te.npz"  # sd-scripts' FluxTextEncoderOutputsCachingStrategy name
DEFAULT_SAMPLE_STEPS = 20  # sd-scripts' FLUX sampler default
DEFAULT_SAMPLE_GUIDANCE = 3.5
# the LoRA target blocks (sd-scripts: every Linear inside DoubleStreamBlock / SingleStreamBlock)
DOUBLE_BLOCKS = ("FluxTransformerBlock", "ChromaTransformerBlock")
SINGLE_BLOCKS = ("FluxSingleTransformerBlock", "ChromaSingleTransformerBlock")
TE_BLOCKS = TEXT_ENCODER_CLASSES + T5_CLASSES


_flag = flag  # a true/false network arg


@dataclass
class FluxConditioning:
    """What the denoiser is conditioned on: T5 states [B, L, D], CLIP-L pooled [B, 768] (None for Chroma) and the
    T5 attention mask [B, L] (1 = a real token)."""

    t5: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor

    def to(self, *args, **kwargs) -> "FluxConditioning":
        t5 = self.t5.to(*args, **kwargs)
        pooled = self.pooled.to(*args, **kwargs) if self.pooled is not None else None
        return FluxConditioning(t5, pooled, self.mask.to(t5.device))

    def __len__(self) -> int:
        return self.t5.shape[0]

    def __getitem__(self, index: int) -> "FluxConditioning":
        return FluxConditioning(self.t5[index], None if self.pooled is None else self.pooled[index], self.mask[index])

    @staticmethod
    def stack(items: Sequence["FluxConditioning"]) -> "FluxConditioning":
        pooled = None if items[0].pooled is None else torch.stack([i.pooled for i in items])
        return FluxConditioning(torch.stack([i.t5 for i in items]), pooled, torch.stack([i.mask for i in items]))


# ------------------------------------------------------------------ packing
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token, channels c-major then (dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents of {h}x{w}: FLUX packs 2x2 patches, so both sides must be even (images a "
                         f"multiple of 16 px)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for latents of `height` x `width`."""
    b, _n, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of packed latent tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# ------------------------------------------------------------------ LoRA names
def bfl_name_map(config: dict):
    """diffusers module path -> BFL module path of the denoiser `config`, from layout.transformer_key_table: a str
    for a layer the BFL file has as it is, (BFL path, part index, part count) for one of several diffusers Linears
    that the BFL layout fuses into one (img_attn.qkv = to_q/to_k/to_v, single_blocks.N.linear1 = to_q/to_k/to_v/
    proj_mlp). Paths the table does not know keep their diffusers name."""
    table: dict[str, Any] = {}
    for rule in layout.transformer_key_table(config):
        if not rule.bfl.endswith(".weight"):
            continue
        bfl = rule.bfl[:-len(".weight")]
        paths = [p[:-len(".weight")] for p in rule.diffusers]
        if len(paths) == 1:
            table[paths[0]] = bfl
        else:
            for i, path in enumerate(paths):
                table[path] = (bfl, i, len(paths))
    return lambda path: table.get(path, path)


def _model_config(model) -> dict:
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(model).__name__
    return cfg


# ------------------------------------------------------------------ the family
class FluxFamily(FlowMatchingNoise, MemoisedCaptions, Family):
    """FLUX.1-dev / schnell and Chroma (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, clip_l: str | None = None,
             t5xxl: str | None = None, ae: str | None = None, model_type: str | None = None, checkpoint=None,
             **_options):
        """A FLUX.1 / Chroma ModelBundle from a diffusers folder, or a BFL single file plus --t5xxl, --ae and (FLUX.1)
        --clip_l. Every part file is checked from its header before any weight is read."""
        from ...models.bundle import ModelBundle, compute_vae_id
        from .weights import load_diffusers_folder, load_single_files

        path = os.fspath(path)
        if os.path.isdir(path):
            kind = model_type or _folder_kind(path)
            parts = load_diffusers_folder(path, dtype=dtype, model_type=kind)
            metadata: dict = {}
        else:
            shapes = checkpoint.shapes if checkpoint is not None else None
            if shapes is None:
                from ...models.checkpoint import open_checkpoint

                checkpoint = open_checkpoint(path)
                shapes = checkpoint.shapes
            found = layout.classify_denoiser(shapes)
            kind = model_type or (CHROMA if found == "chroma" else FLUX)
            label = "Chroma" if found == "chroma" else "FLUX.1"
            for option, value, example in (("t5xxl", t5xxl, "t5xxl_fp16.safetensors"),
                                           ("ae", ae, "ae.safetensors")):
                if not value:
                    raise ModelLoadError(f"{path}: a {label} single file holds only the denoiser; pass the "
                                         f"{option} file too (--{option} {example}), or a diffusers folder")
            if found != "chroma" and not clip_l:
                raise ModelLoadError(f"{path}: FLUX.1 also needs its CLIP-L text encoder: pass --clip_l "
                                     f"clip_l.safetensors")
            parts = load_single_files(path, t5xxl=t5xxl, ae=ae, clip_l=clip_l if found != "chroma" else None,
                                      dtype=dtype, model_type=kind)
            metadata = dict(getattr(checkpoint, "metadata", None) or {})
        family = CHROMA if parts.model_type == "chroma" else FLUX
        if parts.clip_l is not None:
            encoders, tokenizers = [parts.clip_l, parts.t5], [parts.clip_tokenizer, parts.t5_tokenizer]
        else:
            encoders, tokenizers = [parts.t5], [parts.t5_tokenizer]
        bundle = ModelBundle(family, parts.transformer, parts.ae, encoders, tokenizers, path, False,
                             dict(parts.scheduler_config), {}, compute_vae_id(parts.ae), metadata)
        bundle.extra_state = {}
        return bundle

    def parts(self):
        """The bundle as weights.FluxModelParts (for saving a diffusers folder and the sample pipeline)."""
        from .weights import FluxModelParts

        b = self.bundle
        return FluxModelParts(self.model_type, b.denoiser, self.t5, self.t5_tokenizer, b.vae, b.scheduler_config,
                              self.clip_l, self.clip_tokenizer)

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        """The BFL single file of the denoiser (as sd-scripts' flux_train saves), or the whole diffusers folder."""
        from .weights import save_diffusers_folder, save_transformer

        if diffusers:
            save_diffusers_folder(self.parts(), path, dtype=dtype)
        else:
            save_transformer(self.bundle.denoiser, path, dtype=dtype, metadata=metadata)

    # ---- set-up
    def __init__(self, bundle, args=None, *, memo_size: int = 4096, **options):
        super().__init__(bundle, args)
        from .weights import model_type_of

        def option(name: str, default: Any) -> Any:
            value = getattr(args, name, None) if args is not None else None
            value = options.get(name, value)
            return default if value is None else value

        self.model_type = model_type_of(bundle.denoiser)
        self.is_chroma = self.model_type == "chroma"
        self.guidance_embeds = bool(getattr(bundle.denoiser.config, "guidance_embeds", False))
        default_length = 256 if self.model_type == "flux_schnell" else 512
        self.max_length = int(option("t5xxl_max_token_length", default_length))
        self.apply_t5_attn_mask = self.is_chroma or bool(option("apply_t5_attn_mask", False))
        self.guidance_scale = float(option("guidance_scale", DEFAULT_SAMPLE_GUIDANCE))
        self.timestep_sampling = option("timestep_sampling", fm.DEFAULT_TIMESTEP_SAMPLING)
        if self.timestep_sampling not in fm.TIMESTEP_SAMPLINGS:  # the schema's choices include other families'
            from ...options import OptionError

            raise OptionError(f"option 'timestep_sampling': {self.timestep_sampling!r} is not one of "
                              f"{', '.join(fm.TIMESTEP_SAMPLINGS)} for {self.spec.label} models")
        self.sigmoid_scale = float(option("sigmoid_scale", fm.DEFAULT_SIGMOID_SCALE))
        self.model_prediction_type = option("model_prediction_type", fm.DEFAULT_MODEL_PREDICTION_TYPE)
        self.discrete_flow_shift = float(option("discrete_flow_shift", fm.DEFAULT_DISCRETE_FLOW_SHIFT))
        self.weighting_scheme = option("weighting_scheme", fm.DEFAULT_WEIGHTING_SCHEME)
        self.logit_mean = float(option("logit_mean", fm.DEFAULT_LOGIT_MEAN))
        self.logit_std = float(option("logit_std", fm.DEFAULT_LOGIT_STD))
        self.mode_scale = float(option("mode_scale", fm.DEFAULT_MODE_SCALE))
        self.ip_noise_gamma = option("ip_noise_gamma", None)
        self.ip_noise_gamma_random_strength = bool(option("ip_noise_gamma_random_strength", False))
        loss_options = SimpleNamespace(**{n: option(n, None) for n in LOSS_OPTIONS})
        self.loss_settings = LossSettings.from_args(loss_options, has_ddpm_schedule=False,
                                                    label=f"a {self.spec.label} model")
        self.init_memo(memo_size)
        self._clip_tokenizer = bundle.tokenizers[0] if not self.is_chroma else None
        self._t5_tokenizer = bundle.tokenizers[-1]

    # the parts by role (the bundle's lists hold [clip_l, t5] for FLUX.1, [t5] for Chroma; released parts are None)
    @property
    def clip_l(self):
        return None if self.is_chroma else self.bundle.text_encoders[0]

    @property
    def t5(self):
        return self.bundle.text_encoders[-1]

    @property
    def clip_tokenizer(self):
        return self._clip_tokenizer

    @property
    def t5_tokenizer(self):
        return self._t5_tokenizer

    # ---- text
    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(CLIP ids [B, 77] or None, T5 ids [B, L], T5 attention mask [B, L])."""
        t5 = self.t5_tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        clip_ids = None
        if self.clip_tokenizer is not None:
            clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                           return_tensors="pt").input_ids
        return clip_ids, t5.input_ids, t5.attention_mask

    def encode_ids(self, clip_ids: torch.Tensor | None, t5_ids: torch.Tensor,
                   t5_mask: torch.Tensor) -> FluxConditioning:
        t5 = self.t5
        mask = t5_mask.to(t5.device)
        states = t5(t5_ids.to(t5.device), attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        pooled = None
        if clip_ids is not None:
            clip = self.clip_l
            pooled = clip(clip_ids.to(clip.device)).pooler_output.to(states.device)
        return FluxConditioning(states, pooled, mask)

    def encode_batch(self, captions: list[str]) -> FluxConditioning:
        return self.encode_ids(*self.tokenize(captions))

    # ---- text-encoder output cache files (training/te_cache.py), sd-scripts' keys
    def cache_arrays(self, cond: FluxConditioning) -> dict[str, np.ndarray]:
        """One caption's conditioning -> t5_out [L, D] float32, t5_attn_mask [L] int32, apply_t5_attn_mask, and
        l_pooled [768] for FLUX.1."""
        arrays = {"t5_out": cond.t5.detach().float().cpu().numpy(),
                  "t5_attn_mask": cond.mask.detach().cpu().numpy().astype(np.int32),
                  "apply_t5_attn_mask": np.array(self.apply_t5_attn_mask)}
        if cond.pooled is not None:
            arrays["l_pooled"] = cond.pooled.detach().float().cpu().numpy()
        return arrays

    def from_cache_arrays(self, arrays) -> FluxConditioning | None:
        """The inverse of cache_arrays; None when the arrays do not fit this model and these options."""
        try:
            t5_out, mask = np.asarray(arrays["t5_out"]), np.asarray(arrays["t5_attn_mask"])
            applied = bool(np.asarray(arrays["apply_t5_attn_mask"]))
            pooled = None if self.is_chroma else np.asarray(arrays["l_pooled"])
        except KeyError:
            return None
        width = self.bundle.denoiser.config.joint_attention_dim
        if t5_out.shape != (self.max_length, width) or mask.shape != (self.max_length,) or \
                applied != self.apply_t5_attn_mask or (pooled is not None and pooled.ndim != 1):
            return None
        device = self._text_device()
        return FluxConditioning(torch.from_numpy(t5_out.copy()).to(device),
                                None if pooled is None else torch.from_numpy(pooled.copy()).to(device),
                                torch.from_numpy(mask.astype(np.int64)).to(device))

    def _text_device(self) -> torch.device:
        t5 = self.t5
        return t5.device if t5 is not None else next(self.bundle.denoiser.parameters()).device

    # ---- the training step
    def loss_weighted(self) -> bool:
        """The weighting scheme's loss weights apply to the sigma_scaled prediction only."""
        return self.model_prediction_type == "sigma_scaled"

    def predict(self, noised: NoisedLatents, conditioning: FluxConditioning, batch: dict) -> torch.Tensor:
        """The transformer on packed tokens, unpacked, with model_prediction_type applied (see the docstring)."""
        noisy = noised.noisy
        b, _c, h, w = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        cond = conditioning.to(device)
        txt_ids = torch.zeros(cond.t5.shape[1], 3, device=device, dtype=dtype)
        img_ids = image_ids(h, w, device=device, dtype=dtype)
        sigmas = noised.timesteps.float() / fm.NUM_TRAIN_TIMESTEPS
        kwargs: dict[str, Any] = dict(hidden_states=pack_latents(noisy), encoder_hidden_states=cond.t5,
                                      timestep=sigmas.to(dtype), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
        mask = self.attention_mask(cond.mask, h, w) if self.apply_t5_attn_mask else None
        if self.is_chroma:
            kwargs["attention_mask"] = mask
        else:
            kwargs["pooled_projections"] = cond.pooled
            if self.guidance_embeds:
                kwargs["guidance"] = torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
            if mask is not None:
                kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
        pred = self.bundle.denoiser(**kwargs)[0]
        pred = unpack_latents(pred, h, w)
        pred, _weights = fm.apply_model_prediction_type(self.model_prediction_type, pred, noisy, sigmas,
                                                        self.weighting_scheme)
        return pred

    @staticmethod
    def attention_mask(t5_mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """[B, L_text + L_image] bool: the T5 mask, then every image token (text tokens come first in the joint
        sequence)."""
        image = torch.ones(t5_mask.shape[0], (latent_height // 2) * (latent_width // 2), dtype=torch.bool,
                           device=t5_mask.device)
        return torch.cat([t5_mask.bool(), image], dim=1)

    # ---- adapters
    # sd-scripts' lora_flux ranks per layer kind: the words all in a layer's file name, in its order of precedence
    _PART_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
                  ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
                  ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
    _IN_LAYERS = ("img", "time", "vector", "guidance", "txt")  # in_dims order; the BFL names are <kind>_in...
    LORA_NETWORK_ARGS = {"train_blocks": str, "split_qkv": _flag, "train_t5xxl": _flag, "verbose": _flag,
                         "in_dims": str, "train_double_block_indices": str, "train_single_block_indices": str,
                         "network_reg_dims": str, **{key: int for key, _ in _PART_DIMS}}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None,
                    network_args: dict | None = None) -> dict[str, Any]:
        """sd-scripts' networks/lora_flux names: `lora_unet_` + the BFL module path (fused q/k/v(/mlp) layers saved
        as one module), `lora_te1_` CLIP-L and `lora_te3_` T5-XXL (only with train_t5xxl). Targets: every Linear in
        the double and single blocks (`train_blocks` all | double | single); `split_qkv` gives each fused part its
        own down projection (saved block-diagonal) instead of sd-scripts' default shared one. Ranks per layer kind
        (`img_attn_dim` ... `single_mod_dim`, 0 leaves the kind out), `in_dims` = [img, time, vector, guidance, txt]
        adapts the input layers outside the blocks, `train_double_block_indices` / `train_single_block_indices`
        ("all", "none", "0-3,7") keep only those blocks, `network_reg_dims` "regex=rank,..." wins over the rest."""
        from ...networks import network_args as na

        naming = super().lora_naming(family, denoiser)
        args = dict(network_args or {})
        blocks = str(args.get("train_blocks") or "all").lower()
        if blocks not in ("all", "double", "single"):
            from ...errors import NetworkError

            raise NetworkError(f"option 'network_args': train_blocks={blocks!r} is not one of all, double, single")
        classes = (DOUBLE_BLOCKS if blocks in ("all", "double") else ()) + \
            (SINGLE_BLOCKS if blocks in ("all", "single") else ())
        if denoiser is not None:
            config = _model_config(denoiser)
        else:
            config = dict(layout.CHROMA_CONFIG, _class_name="ChromaTransformer2DModel") if family == CHROMA \
                else dict(layout.FLUX_DEV_CONFIG, _class_name="FluxTransformer2DModel")
        train_t5 = _flag(args.get("train_t5xxl", False))
        te_count = len(naming["te_prefixes"])
        name_map = bfl_name_map(config)
        in_dims = na.dim_list(args["in_dims"], cls._IN_LAYERS, "in_dims") if args.get("in_dims") else {}

        def in_rank(name: str) -> int | None:  # sd-scripts matches '_<kind>_in' anywhere in the name
            return next((rank for kind, rank in in_dims.items() if f"_{kind}_in" in name), None)

        def in_layer(path: str):
            file_path = name_map(path)
            name = naming["unet_prefix"] + "_" + (file_path if isinstance(file_path, str) else "").replace(".", "_")
            return file_path if isinstance(file_path, str) and in_rank(name) else None

        def block_of(name: str):
            words = name.split("_")  # lora_unet_double_blocks_<n>_...
            if len(words) > 4 and words[2] in ("double", "single") and words[4].isdigit():
                return words[2], int(words[4])
            return None

        selected = {kind: na.block_selection(args[key], int(config.get(count) or 0) or None, key)
                    for kind, key, count in (("double", "train_double_block_indices", "num_layers"),
                                             ("single", "train_single_block_indices", "num_single_layers"))
                    if args.get(key) is not None}
        rule = na.rank_rule(
            pattern_ranks=na.pattern_dims(args["network_reg_dims"], "network_reg_dims")
            if args.get("network_reg_dims") else (),
            layer_rank=in_rank if in_dims else None,
            part_ranks=[(words, args.get(key)) for key, words in cls._PART_DIMS], block_of=block_of,
            selected=selected)
        naming.update(unet_name_map=name_map, unet_block_classes=classes, te_block_classes=TE_BLOCKS,
                      te_enabled=tuple(i < te_count - 1 or train_t5 for i in range(te_count)),
                      shared_down=not _flag(args.get("split_qkv", False)),
                      unet_extra_name_map=in_layer if any(in_dims.values()) else None, module_rank=rule,
                      unet_file_name_map=name_map,
                      verbose=_flag(args.get("verbose", False)))
        return naming

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list:
        """sd-scripts' split (library/flux_models.py): N // 2 double blocks and twice the rest in single blocks (a
        single block is about half a double one), double blocks first."""
        from ...training.block_swap import SwapGroup

        double = blocks_to_swap // 2
        single = (blocks_to_swap - double) * 2
        return [SwapGroup("transformer_blocks", denoiser.transformer_blocks, double),
                SwapGroup("single_transformer_blocks", denoiser.single_transformer_blocks, single)]

    # ---- metadata
    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """sd-scripts' FLUX names: architecture flux-1-dev / flux-1-schnell / chroma (suffix kept), the BFL (Chroma)
        implementation, no prediction type, ss_model_type flux | chroma."""
        from . import ARCH_CHROMA, ARCH_DEV, ARCH_SCHNELL, IMPL_CHROMA, IMPL_FLUX

        out = dict(metadata)
        arch = {"flux_dev": ARCH_DEV, "flux_schnell": ARCH_SCHNELL, "chroma": ARCH_CHROMA}[self.model_type]
        if "modelspec.architecture" in out:
            _, slash, adapter = out["modelspec.architecture"].partition("/")
            out["modelspec.architecture"] = arch + (slash + adapter if slash else "")
            out["modelspec.implementation"] = IMPL_CHROMA if self.is_chroma else IMPL_FLUX
        out.pop("modelspec.prediction_type", None)
        if out.get("ss_network_module") == "networks.lora":  # our LoRA is sd-scripts' lora_flux here (not LyCORIS)
            out["ss_network_module"] = "networks.lora_flux"
        if out.get("ss_model_type") in (None, "None"):
            out["ss_model_type"] = CHROMA if self.is_chroma else FLUX
        if out.get("ss_t5xxl_max_token_length") in (None, "None") and "ss_t5xxl_max_token_length" in out:
            out["ss_t5xxl_max_token_length"] = str(self.max_length)
        for key, value in (("ss_timestep_sampling", self.timestep_sampling),  # unset options: the family's default
                           ("ss_model_prediction_type", self.model_prediction_type),
                           ("ss_discrete_flow_shift", self.discrete_flow_shift)):
            if out.get(key) in (None, "None") and key in out:
                out[key] = str(value)
        return out

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        """FLUX samples with its flow-matching Euler scheduler whatever sampler is named (as sd-scripts does)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.bundle.scheduler_config)

    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """FluxPipeline / ChromaPipeline around the in-memory modules. Prompt options: --g the guidance embedding
        (FLUX.1-dev, default 3.5), --l true classifier-free guidance with --n (default off, as sd-scripts), --s steps
        (default 20), --w/--h, --d."""
        pipeline = self.parts().pipeline()
        pipeline.scheduler = self.scheduler(sampler)
        pipeline.set_progress_bar_config(disable=True)
        max_length = self.max_length

        def inputs(sample, device) -> dict:
            given = getattr(sample, "given", frozenset())
            steps = sample.steps if "steps" in given else DEFAULT_SAMPLE_STEPS
            cfg = sample.scale if "scale" in given else 1.0
            args: dict[str, Any] = dict(prompt=sample.prompt, num_inference_steps=steps,
                                        max_sequence_length=max_length)
            if self.is_chroma:
                args.update(guidance_scale=cfg, negative_prompt=sample.negative_prompt or "")
            else:
                guidance = getattr(sample, "guidance", None)
                args.update(guidance_scale=DEFAULT_SAMPLE_GUIDANCE if guidance is None else guidance)
                if cfg != 1.0:
                    args.update(true_cfg_scale=cfg, negative_prompt=sample.negative_prompt or "")
            return args

        return SamplePipeline(pipeline, inputs)

    def sample_modules(self) -> list[torch.nn.Module]:
        b = self.bundle
        return [m for m in (b.denoiser, b.vae, *b.text_encoders) if m is not None]


def _folder_kind(path: str) -> str:
    from . import detect_folder

    found = detect_folder(path)
    return CHROMA if found is not None and found.family == CHROMA else FLUX
