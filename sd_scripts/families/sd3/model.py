"""SD3 / SD3.5 on the torch side: loading the parts, caption conditioning, the flow-matching step, the MMDiT call,
sample images, saving, and the names trained files carry.

Conditioning (as sd-scripts 48d368f `library/strategy_sd3.py` and diffusers' StableDiffusion3Pipeline compute it):
- CLIP-L and CLIP-G read 77 tokens each (CLIP-L pads with EOS, CLIP-G with id 0); their penultimate hidden states are
  joined per token -> `lg_out` [B, 77, 768 + 1280]; their projected pooled outputs -> `pooled` [B, 768 + 1280].
- T5-XXL reads `t5xxl_max_token_length` tokens (256 unless set) -> `t5_out` [B, T, 4096].
- The MMDiT's context is `lg_out` zero-padded to the T5 width, then `t5_out` after it along the sequence:
  [B, 77 + T, 4096]. `apply_lg_attn_mask` / `apply_t5_attn_mask` pass the padding masks to the encoders.
- `clip_l_dropout_rate`, `clip_g_dropout_rate`, `t5_dropout_rate`: per training sample, that encoder's part of the
  context and of the pooled vector is zeroed with that probability (Python's `random`, as sd-scripts; accelerate's
  saved state restores it on resume). Applied in `predict`, so memoised and cached encodings stay exact.
Frozen encoders encode each caption once (memoised; `cache_text_encoder_outputs[_to_disk]` does all of them before
training, in sd-scripts' `<image>_sd3_te.npz` files with its keys).

The step (sd-scripts `sd3_train_network.py` / `sd3_train_utils.get_noisy_model_input_and_timesteps`): u from the
`weighting_scheme` density, shifted by `training_shift`, t = floor(u * (max - min) + min), sigma = t / 1000,
noisy = (1 - sigma) x0 + sigma n; the MMDiT gets t; its output is preconditioned to an x0 estimate
pred * (-sigma) + noisy and compared with x0, weighted per sample by the scheme (`training/flow_matching.py`).
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...errors import ModelLoadError
from ...networks.network_args import flag
from ...networks.targets import SWAP_HALVES, T5_CLASSES, TEXT_ENCODER_CLASSES
from ...options import OptionError
from ...training import flow_matching as fm
from ...training.loss import LossSettings
from ..base import Family, NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from . import MODEL_TYPES, layout

log = logging.getLogger(__name__)

CLIP_LENGTH = 77
#: the diffusers modules inside SD3's joint blocks whose Linears sd-scripts' SingleDiTBlock targets cover
# the joint blocks' layers (the last block's context adaLN is an AdaLayerNormContinuous; the final layer's one,
# outside the blocks, is not adapted: see lora_naming)
UNET_BLOCKS = ("Attention", "FeedForward", "AdaLayerNormZero", "SD35AdaLayerNormZeroX", "AdaLayerNormContinuous")
DEFAULT_T5_LENGTH = 256  # sd-scripts' --t5xxl_max_token_length default for SD3
TE_CACHE_SUFFIX = "_sd3_te.npz"  # sd-scripts' Sd3TextEncoderOutputsCachingStrategy name
_PART_OPTIONS = (("clip_l", "--clip_l", "the clip_l.safetensors file"),
                 ("clip_g", "--clip_g", "the clip_g.safetensors file"),
                 ("t5xxl", "--t5xxl", "a t5xxl .safetensors file (e.g. t5xxl_fp16.safetensors)"),
                 ("vae", "--vae", "the SD3 VAE file"))


@dataclass
class SD3Conditioning:
    """What the MMDiT is conditioned on: CLIP-L + CLIP-G penultimate states [B, 77, Wl + Wg], T5 states [B, T, Wt]
    and the pooled CLIP-L + CLIP-G vector [B, Pl + Pg]."""

    lg_out: torch.Tensor
    t5_out: torch.Tensor
    pooled: torch.Tensor

    def to(self, *args, **kwargs) -> "SD3Conditioning":
        return SD3Conditioning(self.lg_out.to(*args, **kwargs), self.t5_out.to(*args, **kwargs),
                               self.pooled.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.lg_out.shape[0]

    def __getitem__(self, index: int) -> "SD3Conditioning":
        """One caption's conditioning (no batch dimension)."""
        return SD3Conditioning(self.lg_out[index], self.t5_out[index], self.pooled[index])

    @staticmethod
    def stack(items: Sequence["SD3Conditioning"]) -> "SD3Conditioning":
        return SD3Conditioning(torch.stack([i.lg_out for i in items]), torch.stack([i.t5_out for i in items]),
                               torch.stack([i.pooled for i in items]))


# ------------------------------------------------------------------ loading
def _header(path: str) -> dict[str, tuple] | None:
    from .. import read_safetensors_header

    if not path.lower().endswith(".safetensors"):
        return None
    try:
        return read_safetensors_header(path)[0]
    except (OSError, ValueError):
        return None


def check_part_files(path: str, shapes: Mapping[str, tuple] | None, options: Mapping[str, str | None]) -> None:
    """Before any weight is read: every part the model lacks is given by an option, every option names an existing
    file of the right kind. ModelLoadError naming the option and the fix otherwise."""
    for name, option, what in _PART_OPTIONS:
        given = options.get(name)
        if not given:
            continue
        if not os.path.exists(given):
            raise ModelLoadError(f"{given}: no such file ({option}); check the path of {what}")
        part = _header(given)
        if part is None:
            continue
        if name in ("clip_l", "clip_g") and layout.is_t5_encoder(part):
            raise ModelLoadError(f"{given}: this is a T5 encoder, not a CLIP text encoder; pass it as --t5xxl and "
                                 f"give {option} {what}")
        if name == "t5xxl" and not any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in part):
            kind = "a CLIP text encoder" if layout.clip_prefix(part) is not None else "not a T5 encoder"
            raise ModelLoadError(f"{given}: {kind}, but --t5xxl needs {what}")
    if os.path.isdir(path):
        have = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3", "vae": "vae"}
        present = {name: os.path.isdir(os.path.join(path, sub)) for name, sub in have.items()}
    elif shapes is not None:
        present = layout.bundled_parts(shapes)
    else:
        return
    for name, option, what in _PART_OPTIONS:
        if not present.get(name) and not options.get(name):
            raise ModelLoadError(f"{path}: the model does not include {name}; pass {option} with {what}")


def _t5_tokenizer(folder: str | None):
    from ...models.t5 import load_t5_tokenizer, t5_tokenizer_folder

    if folder:
        try:
            t5_tokenizer_folder(folder)
        except ModelLoadError:
            folder = None  # tokenizer_cache_dir holds other tokenizers only: the bundled T5 one is the same
    return load_t5_tokenizer(folder)


def _load_t5(source: str, dtype: torch.dtype):
    from ...models.t5 import load_t5_encoder

    if os.path.isdir(source):  # a pipeline folder's text_encoder_3/
        from transformers import T5EncoderModel

        try:
            return T5EncoderModel.from_pretrained(source, local_files_only=True, torch_dtype=dtype).eval()
        except Exception as e:  # noqa: BLE001 - a broken folder is the user's
            raise ModelLoadError(f"{source}: cannot load the T5 encoder ({str(e).splitlines()[0][:160]}); "
                                 f"re-download the model or pass --t5xxl") from None
    return load_t5_encoder(source, dtype)


def load_bundle(path: str, *, dtype: torch.dtype = torch.float32, clip_l: str | None = None,
                clip_g: str | None = None, t5xxl: str | None = None, vae: str | None = None,
                tokenizer_cache_dir: str | None = None, checkpoint=None):
    """An SD3 / SD3.5 model as a ModelBundle (denoiser = SD3Transformer2DModel; text encoders CLIP-L, CLIP-G, T5;
    tokenizers in the same order), offline, with the part files the options name."""
    from ...models.bundle import ModelBundle, compute_vae_id
    from ...models.tokenizer import load_clip_tokenizer
    from .weights import load_sd3, require_text_encoders

    options = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "vae": vae}
    shapes = checkpoint.shapes if checkpoint is not None else (_header(path) if os.path.isfile(path) else None)
    check_part_files(path, shapes, options)
    parts = load_sd3(path, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, vae=vae, dtype=dtype)
    require_text_encoders(parts)
    t5 = _load_t5(parts.t5xxl_source, dtype)
    tokenizers = [load_clip_tokenizer("eos"), load_clip_tokenizer("zero"), _t5_tokenizer(tokenizer_cache_dir)]
    return ModelBundle("sd3", parts.transformer, parts.vae, [parts.clip_l, parts.clip_g, t5], tokenizers,
                       os.path.abspath(path), False, dict(layout.SCHEDULER_CONFIG), {}, compute_vae_id(parts.vae),
                       dict(parts.metadata))


def variant_of(transformer) -> str:
    """'sd3_medium', 'sd35_medium' or 'sd35_large' of a loaded MMDiT."""
    from .weights import _variant_of_config

    return _variant_of_config(transformer.config)


# ------------------------------------------------------------------ positional embedding
POS_EMBED_TABLE_RATIO = 1.5  # a scaled table is this much wider than its latent (sd-scripts' MMDiT)
POS_EMBED_BASE_SIZE = 16  # the grid size the sine-cosine coordinates are scaled to (sd-scripts)


def scaled_sincos_table(width: int, grid: int, sample: int, base: int = POS_EMBED_BASE_SIZE) -> torch.Tensor:
    """[grid * grid, width] sine-cosine positional table whose coordinates span `base` units over the central
    `sample` x `sample` cells (sd-scripts' scaled embedding for --enable_scaled_pos_embed): a position p of the grid
    sits at p * s / grid - s * (grid - sample) / (2 grid), with s = base * grid / sample. Row-major over (row, col);
    the first half of the channels encodes the column, the second the row, each as [sin, cos] of the coordinate
    times 10000^(-k / (width / 4))."""
    scale = base * grid / sample
    coords = torch.arange(grid, dtype=torch.float64) / grid * scale - scale * (grid - sample) / (2 * grid)
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PositionTable:
    """The MMDiT's positional embedding per call, replacing the patch embedding's `cropped_pos_embed`:
    - `pos_emb_random_crop_rate` (sd-scripts, meant for SD3.5 medium): on a share of the training calls the table is
      cropped at a random place instead of the centre; `decide()` draws (torch's global RNG, as sd-scripts) before
      each training call;
    - `enable_scaled_pos_embed`: instead of the model's one table, a scaled table per training resolution
      (`use_resolutions`), chosen by the latent's area, so that each resolution sees its positions at the scale of
      the model's native one (multi-resolution training of SD3.5 medium, as sd-scripts)."""

    def __init__(self, patch_embed, rate: float, scaled: bool):
        self.patch_embed, self.rate, self.scaled, self.random_now = patch_embed, float(rate), scaled, False
        self.tables: dict[int, torch.Tensor] = {}  # patched latent size -> scaled table
        self.limits: list[tuple[int, int]] = []  # (largest area, patched size), ascending
        self._centred = patch_embed.cropped_pos_embed
        patch_embed.cropped_pos_embed = self.crop

    def use_resolutions(self, resolutions) -> None:
        """The training resolutions (width, height): one scaled table per distinct latent size."""
        if not self.scaled:
            return
        patch = self.patch_embed.patch_size
        sizes = sorted({round(math.sqrt(w * h)) // 8 // patch for w, h in resolutions})
        self.tables, self.limits = {}, []
        for i, size in enumerate(sizes):
            limit = (size ** 2 + sizes[i + 1] ** 2) // 2 if i + 1 < len(sizes) else \
                int((size * POS_EMBED_TABLE_RATIO) ** 2)
            self._add(size, limit)

    def _add(self, size: int, limit: int) -> None:
        width = self.patch_embed.pos_embed.shape[-1]
        self.tables[size] = scaled_sincos_table(width, int(size * POS_EMBED_TABLE_RATIO), size)
        self.limits = sorted([*(x for x in self.limits if x[1] != size), (limit, size)])

    def decide(self) -> None:
        self.random_now = self.rate > 0 and float(torch.rand(1)) < self.rate

    def _scaled_table(self, h: int, w: int) -> tuple[torch.Tensor, int]:
        if not self.tables:
            raise OptionError("option 'enable_scaled_pos_embed': the training resolutions were not given to the "
                              "model (internal order of set-up)")
        size = next((s for limit, s in self.limits if h * w <= limit), self.limits[-1][1])
        grid = int(size * POS_EMBED_TABLE_RATIO)
        if h > grid or w > grid:  # a very tall or wide bucket: a table for its longer side
            size = max(h, w)
            grid = int(size * POS_EMBED_TABLE_RATIO)
            self._add(size, grid ** 2)
            log.info("scaled positional table added for a %dx%d latent (patched)", h, w)
        return self.tables[size], grid

    def crop(self, height: int, width: int) -> torch.Tensor:
        pe = self.patch_embed
        h, w = height // pe.patch_size, width // pe.patch_size
        if self.scaled:
            table, size = self._scaled_table(h, w)
        elif not self.random_now:
            return self._centred(height, width)
        else:
            table, size = pe.pos_embed, pe.pos_embed_max_size
            if h > size or w > size:
                return self._centred(height, width)  # raises diffusers' own error
        if self.random_now:
            top, left = int(torch.randint(0, size - h + 1, (1,))), int(torch.randint(0, size - w + 1, (1,)))
        else:
            top, left = (size - h) // 2, (size - w) // 2
        table = table.to(device=pe.pos_embed.device, dtype=pe.pos_embed.dtype)
        cropped = table.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
        return cropped.reshape(1, -1, cropped.shape[-1])


# ------------------------------------------------------------------ family
class SD3Family(MemoisedCaptions, Family):
    """SD3 medium, SD3.5 medium and SD3.5 large (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    def __init__(self, bundle, args=None, *, memo_size: int = 4096):
        super().__init__(bundle, args)
        option = (lambda name, default=None: getattr(args, name, default)) if args is not None else \
            (lambda name, default=None: default)
        self.t5_length = int(option("t5xxl_max_token_length") or DEFAULT_T5_LENGTH)
        self.apply_lg_attn_mask = bool(option("apply_lg_attn_mask", False))
        self.apply_t5_attn_mask = bool(option("apply_t5_attn_mask", False))
        self.dropout_rates = tuple(float(option(n, 0.0) or 0.0) for n in
                                   ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate"))
        self.weighting_scheme = option("weighting_scheme") or fm.DEFAULT_WEIGHTING_SCHEME
        self.density = dict(logit_mean=_or(option("logit_mean"), fm.DEFAULT_LOGIT_MEAN),
                            logit_std=_or(option("logit_std"), fm.DEFAULT_LOGIT_STD),
                            mode_scale=_or(option("mode_scale"), fm.DEFAULT_MODE_SCALE),
                            training_shift=_or(option("training_shift"), fm.DEFAULT_TRAINING_SHIFT),
                            min_timestep=option("min_timestep"), max_timestep=option("max_timestep"))
        self.ip_noise_gamma = option("ip_noise_gamma")
        self.ip_noise_gamma_random_strength = bool(option("ip_noise_gamma_random_strength", False))
        self.loss_settings = LossSettings.from_args(args, has_ddpm_schedule=False, label=f"a {self.spec.label} model")
        clip_l, clip_g, t5 = (list(bundle.text_encoders) + [None] * 3)[:3]
        if clip_l is None or clip_g is None:
            raise ValueError("an SD3 bundle needs CLIP-L and CLIP-G")
        self.widths = (int(clip_l.config.hidden_size), int(clip_g.config.hidden_size))
        self.pooled_widths = (int(clip_l.config.projection_dim), int(clip_g.config.projection_dim))
        self.t5_width = int(bundle.denoiser.config.joint_attention_dim)
        self.variant = variant_of(bundle.denoiser)
        rate = float(option("pos_emb_random_crop_rate", 0.0) or 0.0)
        scaled = bool(option("enable_scaled_pos_embed", False))
        self.position_crop = PositionTable(bundle.denoiser.pos_embed, rate, scaled) if rate > 0 or scaled else None
        self.init_memo(memo_size)

    def use_resolutions(self, resolutions) -> None:
        """enable_scaled_pos_embed: a positional table per training resolution (sd-scripts' latent sizes)."""
        if self.position_crop is not None:
            self.position_crop.use_resolutions(resolutions)

    @property
    def max_length(self) -> int:
        """The T5 token length (what cached encodings depend on besides the weights)."""
        return self.t5_length

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, clip_l: str | None = None,
             clip_g: str | None = None, t5xxl: str | None = None, vae: str | None = None,
             tokenizer_cache_dir: str | None = None, checkpoint=None, **_options):
        return load_bundle(path, dtype=dtype, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, vae=vae,
                           tokenizer_cache_dir=tokenizer_cache_dir, checkpoint=checkpoint)

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        from .saving import save_diffusers, save_single_file

        if diffusers:
            save_diffusers(self.bundle, path, dtype=dtype)
        else:
            save_single_file(self.bundle, path, dtype=dtype, metadata=metadata)

    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """The variant's names, as sd-scripts writes them: ss_base_model_version 'medium' / '5-medium' / '5-large',
        modelspec.architecture 'stable-diffusion-3-<type>' (keeping an adapter suffix such as '/lora')."""
        out = dict(metadata, ss_base_model_version=MODEL_TYPES[self.variant])
        arch = metadata.get("modelspec.architecture")
        if arch is not None:
            _, slash, adapter = arch.partition("/")
            out["modelspec.architecture"] = layout.MODELSPEC_ARCHITECTURE[self.variant] + slash + adapter
        return out

    # ---- text
    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """(CLIP-L ids, CLIP-G ids, T5 ids, CLIP-L mask, CLIP-G mask, T5 mask)."""
        tok_l, tok_g, tok_t5 = self.bundle.tokenizers[:3]
        out_l, out_g = (tok(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                            return_tensors="pt") for tok in (tok_l, tok_g))
        out_t5 = tok_t5(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                        return_tensors="pt")
        return (out_l.input_ids, out_g.input_ids, out_t5.input_ids, out_l.attention_mask, out_g.attention_mask,
                out_t5.attention_mask)

    def encode_tokens(self, tokens: tuple[torch.Tensor, ...]) -> SD3Conditioning:
        """Token ids and masks -> conditioning (no dropout)."""
        ids_l, ids_g, ids_t5, mask_l, mask_g, mask_t5 = tokens
        clip_l, clip_g, t5 = self.bundle.text_encoders[:3]
        states, pooled = [], []
        for encoder, ids, mask in ((clip_l, ids_l, mask_l), (clip_g, ids_g, mask_g)):
            mask = mask.to(encoder.device) if self.apply_lg_attn_mask else None
            out = encoder(ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        device = states[0].device
        lg_out = torch.cat([states[0], states[1].to(device, states[0].dtype)], dim=-1)
        lg_pooled = torch.cat([pooled[0], pooled[1].to(device, pooled[0].dtype)], dim=-1)
        mask = mask_t5.to(t5.device) if self.apply_t5_attn_mask else None
        t5_out = t5(ids_t5.to(t5.device), attention_mask=mask).last_hidden_state
        return SD3Conditioning(lg_out, t5_out.to(device), lg_pooled)

    def encode_batch(self, captions: list[str]) -> SD3Conditioning:
        return self.encode_tokens(self.tokenize(captions))

    # ---- text-encoder output cache files (sd-scripts' keys, so its trainer reads ours and we read its)
    def cache_arrays(self, cond: SD3Conditioning) -> dict[str, np.ndarray]:
        """One caption's conditioning -> lg_out [77, Wl+Wg], t5_out [T, Wt], lg_pooled [Pl+Pg] (float32), the
        masks and the mask options."""
        tokens = self.tokenize([""])  # mask shapes only; masks are not used by the MMDiT
        return {"lg_out": cond.lg_out.detach().float().cpu().numpy(),
                "t5_out": cond.t5_out.detach().float().cpu().numpy(),
                "lg_pooled": cond.pooled.detach().float().cpu().numpy(),
                "clip_l_attn_mask": np.ones(tokens[3].shape[1], np.int64),
                "clip_g_attn_mask": np.ones(tokens[4].shape[1], np.int64),
                "t5_attn_mask": np.ones(tokens[5].shape[1], np.int64),
                "apply_lg_attn_mask": np.array(self.apply_lg_attn_mask),
                "apply_t5_attn_mask": np.array(self.apply_t5_attn_mask)}

    def from_cache_arrays(self, arrays) -> SD3Conditioning | None:
        """The inverse of cache_arrays; None when the arrays do not fit this model, T5 length or mask options."""
        try:
            lg, t5, pooled = (np.asarray(arrays[k]) for k in ("lg_out", "t5_out", "lg_pooled"))
            flags = (bool(np.asarray(arrays["apply_lg_attn_mask"])), bool(np.asarray(arrays["apply_t5_attn_mask"])))
        except KeyError:
            return None
        if lg.shape != (CLIP_LENGTH, sum(self.widths)) or t5.shape != (self.t5_length, self.t5_width) \
                or pooled.shape != (sum(self.pooled_widths),) \
                or flags != (self.apply_lg_attn_mask, self.apply_t5_attn_mask):
            return None
        device = self.bundle.denoiser.device
        return SD3Conditioning(*(torch.from_numpy(a.copy()).to(device) for a in (lg, t5, pooled)))

    # ---- the training step
    def noised(self, latents: torch.Tensor, generator: torch.Generator | None) -> NoisedLatents:
        from ...training.noise import make_noise, perturbed_noise

        noise = make_noise(latents, None, generator=generator)
        sigmas, timesteps = fm.sample_sd3_sigmas(latents.shape[0], weighting_scheme=self.weighting_scheme,
                                                 generator=generator, device=latents.device, **self.density)
        # input perturbation as sd-scripts' FLUX.1 trainer defines it for flow matching (its SD3 trainer skips it)
        model_input_noise = perturbed_noise(noise, self.ip_noise_gamma, self.ip_noise_gamma_random_strength,
                                            generator=generator)
        weights = fm.loss_weighting(self.weighting_scheme, sigmas) \
            if self.weighting_scheme in ("sigma_sqrt", "cosmap") else None
        return NoisedLatents(fm.add_flow_noise(latents, model_input_noise, sigmas), timesteps, fm.sd3_target(latents),
                             weights, self.loss_settings.loss_type,
                             self.loss_settings.thresholds(timesteps, fm.NUM_TRAIN_TIMESTEPS))

    def dropped(self, cond: SD3Conditioning) -> SD3Conditioning:
        """Per sample, zero each encoder's part with its dropout rate (CLIP-L, CLIP-G, T5; sd-scripts' order)."""
        if not any(self.dropout_rates):
            return cond
        batch = len(cond)
        keep = torch.ones(3, batch)
        for i in range(batch):
            for j, rate in enumerate(self.dropout_rates):
                if rate > 0 and random.random() < rate:
                    keep[j, i] = 0.0
        wl, pl = self.widths[0], self.pooled_widths[0]

        def split_scale(t: torch.Tensor, width: int, shape: tuple) -> torch.Tensor:
            k_l, k_g = (keep[j].to(t.device, t.dtype).reshape(shape) for j in (0, 1))
            return torch.cat([t[..., :width] * k_l, t[..., width:] * k_g], dim=-1)

        t5_keep = keep[2].to(cond.t5_out.device, cond.t5_out.dtype).reshape(batch, 1, 1)
        return SD3Conditioning(split_scale(cond.lg_out, wl, (batch, 1, 1)), cond.t5_out * t5_keep,
                               split_scale(cond.pooled, pl, (batch, 1)))

    def context(self, cond: SD3Conditioning) -> torch.Tensor:
        """[B, 77 + T, Wt]: CLIP states zero-padded to the T5 width, then the T5 states."""
        lg = torch.nn.functional.pad(cond.lg_out, (0, self.t5_width - cond.lg_out.shape[-1]))
        return torch.cat([lg, cond.t5_out.to(lg.dtype)], dim=-2)

    def predict(self, noised: NoisedLatents, conditioning: SD3Conditioning, batch) -> torch.Tensor:
        """The MMDiT's output preconditioned to an x0 estimate: pred * (-sigma) + noisy."""
        cond = self.dropped(conditioning)
        if self.position_crop is not None:
            self.position_crop.decide()
        noisy = noised.noisy
        pred = self.bundle.denoiser(hidden_states=noisy, encoder_hidden_states=self.context(cond).to(noisy.device),
                                    pooled_projections=cond.pooled.to(noisy.device), timestep=noised.timesteps,
                                    return_dict=False)[0]
        return fm.precondition_prediction(pred, noisy, noised.timesteps.float() / fm.NUM_TRAIN_TIMESTEPS)

    # ---- adapters
    # sd-scripts' lora_sd3 ranks per layer kind (the words all in a layer's file name) and emb_dims' layers
    _PART_DIMS = (("context_attn_dim", ("context_block", "attn")), ("context_mlp_dim", ("context_block", "mlp")),
                  ("context_mod_dim", ("context_block", "adaLN_modulation")), ("x_attn_dim", ("x_block", "attn")),
                  ("x_mlp_dim", ("x_block", "mlp")), ("x_mod_dim", ("x_block", "adaLN_modulation")))
    _EMB_LAYERS = ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
                   "final_layer_linear")  # emb_dims order, matched in the file name as sd-scripts does
    LORA_NETWORK_ARGS = {"split_qkv": flag, "train_t5xxl": flag, "verbose": flag, "emb_dims": str,
                         "train_block_indices": str, **{key: int for key, _ in _PART_DIMS}}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None,
                    network_args: dict | None = None) -> dict[str, Any]:
        """sd-scripts' networks/lora_sd3 names: `lora_unet_` + the SAI module path (`joint_blocks_N_x_block_attn_qkv`:
        q/k/v saved as one fused module with a shared down projection, or one down each with `split_qkv`),
        `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5 (only with `train_t5xxl`, as sd-scripts). Targets:
        the Linears of the joint blocks' attention, feed-forward and adaLN layers; the last block's context adaLN
        (and the final layer's) is saved with its up rows' halves exchanged (SAI stores (shift, scale), diffusers
        (scale, shift)). Ranks per layer kind (`context_attn_dim` ... `x_mod_dim`, 0 leaves the kind out),
        `emb_dims` = [context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear] adapts the
        layers outside the blocks, `train_block_indices` ("all", "none", "0-3,7") keeps only those joint blocks."""
        from ...networks import network_args as na

        naming = super().lora_naming(family, denoiser)
        args = dict(network_args or {})
        config = dict(denoiser.config) if denoiser is not None else dict(layout.TRANSFORMER_DEFAULTS, num_layers=24)
        table: dict[str, Any] = {}
        for sai, names, kind in layout.transformer_key_table(config):
            if not sai.endswith(".weight"):
                continue
            paths = [n[: -len(".weight")] for n in names]
            for i, path in enumerate(paths):
                if kind == layout.SWAP:
                    table[path] = (sai[: -len(".weight")], SWAP_HALVES)
                else:
                    table[path] = sai[: -len(".weight")] if len(paths) == 1 else (sai[: -len(".weight")], i,
                                                                                  len(paths))
        emb_dims = na.dim_list(args["emb_dims"], [n.strip("_") for n in cls._EMB_LAYERS], "emb_dims") \
            if args.get("emb_dims") else {}
        emb_ranks = dict(zip(cls._EMB_LAYERS, emb_dims.values()))

        def emb_rank(name: str) -> int | None:
            return next((rank for word, rank in emb_ranks.items() if word in name), None)

        def emb_layer(path: str):
            entry = table.get(path)
            file_path = entry[0] if isinstance(entry, tuple) else entry
            return entry if file_path and emb_rank(f"{naming['unet_prefix']}_{file_path.replace('.', '_')}") else None

        def block_of(name: str):
            words = name.split("_")  # lora_unet_joint_blocks_<n>_...
            return ("joint", int(words[4])) if len(words) > 4 and words[2] == "joint" and words[4].isdigit() \
                else None

        selected = {"joint": na.block_selection(args["train_block_indices"], int(config.get("num_layers") or 0)
                                                or None, "train_block_indices")} \
            if args.get("train_block_indices") is not None else {}
        rule = na.rank_rule(layer_rank=emb_rank if emb_ranks else None, block_of=block_of, selected=selected,
                            part_ranks=[(words, args.get(key)) for key, words in cls._PART_DIMS])
        naming.update(unet_name_map=lambda path: table.get(path, path) if path.startswith("transformer_blocks.")
                      else None, unet_block_classes=UNET_BLOCKS, te_block_classes=TEXT_ENCODER_CLASSES + T5_CLASSES,
                      te_enabled=(True, True, flag(args.get("train_t5xxl", False))),
                      shared_down=not flag(args.get("split_qkv", False)),
                      unet_extra_name_map=emb_layer if any(emb_ranks.values()) else None, module_rank=rule,
                      unet_file_name_map=table.get, verbose=flag(args.get("verbose", False)))
        return naming

    @classmethod
    def trainable_text_encoders(cls, args) -> tuple[bool, ...]:
        """CLIP-L and CLIP-G; T5-XXL only with train_t5xxl (sd3_train)."""
        return True, True, bool(getattr(args, "train_t5xxl", False))

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list:
        """The MMDiT's joint blocks, N of them (sd-scripts library/sd3_models.py)."""
        from ...training.block_swap import SwapGroup

        return [SwapGroup("transformer_blocks", denoiser.transformer_blocks, blocks_to_swap)]

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        """SD3 samples with the flow-matching Euler scheduler (shift 3.0) whatever sampler a prompt names."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(layout.SCHEDULER_CONFIG)

    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """StableDiffusion3Pipeline around the in-memory modules; it encodes the prompts itself (penultimate CLIP
        states, pooled CLIP outputs, T5 at this run's token length)."""
        from diffusers import StableDiffusion3Pipeline

        b = self.bundle
        (clip_l, clip_g, t5), (tok_l, tok_g, tok_t5) = b.text_encoders[:3], b.tokenizers[:3]
        pipeline = StableDiffusion3Pipeline(transformer=b.denoiser, scheduler=self.scheduler(sampler), vae=b.vae,
                                            text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                            tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
        pipeline.set_progress_bar_config(disable=True)
        length = self.t5_length
        return SamplePipeline(pipeline, lambda sample, device: dict(
            prompt=sample.prompt, negative_prompt=sample.negative_prompt or "", max_sequence_length=length))


def _or(value, default):
    return default if value is None else value
