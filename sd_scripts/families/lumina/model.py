"""Lumina Image 2.0 on the shared loop: loading the parts, Gemma-2 conditioning, the flow-matching step (Lumina's
reversed time), the denoiser call, LoRA names, block swap and the sample pipeline.

Conditioning (sd-scripts 48d368f `library/strategy_lumina.py`): the caption, after `system_prompt + ' <Prompt Start> '`
when a system prompt is set (never for negative prompts), in Gemma tokens padded on the right to
`gemma2_max_token_length` (default 256; a multiple of 8) -> Gemma-2's penultimate hidden states
[B, L, 2304] and the attention mask [B, L] (the denoiser sees only the real tokens).

The step (sd-scripts `lumina_train_network.py`, `library/lumina_train_util.get_noisy_model_input_and_timesteps`):
sigma from `timestep_sampling` (default 'shift': sigmoid(N(0,1) * sigmoid_scale) shifted by discrete_flow_shift, 6.0;
'nextdit_shift': uniform sigma time-shifted by the FLUX mu of the image's patch count; the other modes as FLUX.1's),
noisy = (1 - sigma) x0 + sigma n, and - unlike FLUX.1 - the denoiser is given t = 1 - sigma (Lumina's time runs from
noise at 0 to the image at 1) and predicts the velocity towards the image: the target is x0 - n. With
`model_prediction_type` (default raw) applied as sd-scripts does (additive: + noisy; sigma_scaled: pred * -sigma +
noisy with the weighting scheme's loss weights, compared with the same target).
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import NetworkError
from ...networks.network_args import flag
from ...options import OptionError
from ...training import flow_matching as fm
from ...training.loss import LOSS_OPTIONS, LossSettings
from ...training.noise import perturbed_noise
from ..base import Family, NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from . import LUMINA, TIMESTEP_SAMPLINGS, layout

log = logging.getLogger(__name__)

TE_CACHE_SUFFIX = "_lumina_te.npz"  # sd-scripts' LuminaTextEncoderOutputsCachingStrategy name
DEFAULT_MAX_LENGTH = 256
PROMPT_START = "<Prompt Start>"
# sd-scripts' defaults for Lumina (lumina_train_util.add_lumina_train_arguments; they differ from FLUX.1's)
DEFAULT_TIMESTEP_SAMPLING = "shift"
DEFAULT_MODEL_PREDICTION_TYPE = "raw"
DEFAULT_DISCRETE_FLOW_SHIFT = 6.0
# sd-scripts' Lumina sampler defaults (lumina_train_util.sample_image_inference)
DEFAULT_SAMPLE_STEPS = 36
DEFAULT_SAMPLE_SCALE = 3.5
DEFAULT_CFG_TRUNC_RATIO = 0.25
# LoRA targets (sd-scripts: every Linear in JointTransformerBlock and FinalLayer; Gemma-2's attention and MLP)
UNET_BLOCKS = ("Lumina2TransformerBlock", "LuminaLayerNormContinuous")
TE_BLOCKS = ("Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP")


@dataclass
class LuminaConditioning:
    """Gemma-2 penultimate states [B, L, D], the attention mask [B, L] (1 = a real token) and the token ids."""

    hidden: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor

    def to(self, *args, **kwargs) -> "LuminaConditioning":
        hidden = self.hidden.to(*args, **kwargs)
        return LuminaConditioning(hidden, self.mask.to(hidden.device), self.input_ids.to(hidden.device))

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int) -> "LuminaConditioning":
        return LuminaConditioning(self.hidden[index], self.mask[index], self.input_ids[index])

    @staticmethod
    def stack(items: Sequence["LuminaConditioning"]) -> "LuminaConditioning":
        return LuminaConditioning(torch.stack([i.hidden for i in items]), torch.stack([i.mask for i in items]),
                                  torch.stack([i.input_ids for i in items]))


# ------------------------------------------------------------------ the step's maths
def sample_sigmas(timestep_sampling: str, batch_size: int, *, latent_height: int, latent_width: int,
                  sigmoid_scale: float = fm.DEFAULT_SIGMOID_SCALE,
                  discrete_flow_shift: float = DEFAULT_DISCRETE_FLOW_SHIFT,
                  weighting_scheme: str = fm.DEFAULT_WEIGHTING_SCHEME, logit_mean: float = fm.DEFAULT_LOGIT_MEAN,
                  logit_std: float = fm.DEFAULT_LOGIT_STD, mode_scale: float = fm.DEFAULT_MODE_SCALE,
                  generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps = sigmas * 1000) of Lumina's `--timestep_sampling`: 'nextdit_shift' is sigma ~ U[0, 1)
    (clamped to 1e-7) time-shifted with mu = FLUX's linear mu of the patch count (h // 2) * (w // 2); 'flux_shift'
    clamps the sigmoid sample to 1e-7 before the same shift; the other modes are FLUX.1's
    (training/flow_matching.sample_flux_sigmas), with Lumina's default shift 6.0."""
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}; got "
                         f"{timestep_sampling!r}")
    mu = fm.flux_mu(fm.flux_packed_sequence_length(latent_height, latent_width))
    if timestep_sampling in ("nextdit_shift", "flux_shift"):
        gen_device = generator.device if generator is not None else (device or "cpu")
        if timestep_sampling == "nextdit_shift":
            sigmas = torch.rand((batch_size,), generator=generator, device=gen_device)
        else:
            sigmas = torch.sigmoid(torch.randn((batch_size,), generator=generator, device=gen_device)
                                   * sigmoid_scale)
        sigmas = fm.flux_time_shift(mu, sigmas.clamp(min=1e-7)).to(device or gen_device)
        return sigmas, sigmas * fm.NUM_TRAIN_TIMESTEPS
    return fm.sample_flux_sigmas(timestep_sampling, batch_size, latent_height=latent_height,
                                 latent_width=latent_width, sigmoid_scale=sigmoid_scale,
                                 discrete_flow_shift=discrete_flow_shift, weighting_scheme=weighting_scheme,
                                 logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                                 generator=generator, device=device)


def lumina_time(sigmas: torch.Tensor) -> torch.Tensor:
    """The denoiser's time of noise level sigma: t = 1 - sigma (0 = pure noise, 1 = the image)."""
    return 1.0 - sigmas


def lumina_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Lumina's velocity target x0 - noise (the reverse of FLUX.1's noise - x0), as sd-scripts trains it."""
    return latents - noise


# ------------------------------------------------------------------ the family
class LuminaFamily(MemoisedCaptions, Family):
    """Lumina Image 2.0 (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, gemma2: str | None = None, ae: str | None = None,
             tokenizer_cache_dir: str | None = None, checkpoint=None, **_options):
        """A ModelBundle from a diffusers Lumina2Pipeline folder, or an Alpha-VLLM single file with --gemma2 and
        --ae (an all-in-one file gives the parts it holds)."""
        from ...models.bundle import ModelBundle, compute_vae_id
        from .weights import load_parts

        path = os.fspath(path)
        parts = load_parts(path, dtype=dtype, gemma2=gemma2, ae=ae, tokenizer_cache_dir=tokenizer_cache_dir,
                           checkpoint=checkpoint)
        return ModelBundle(LUMINA, parts.transformer, parts.ae, [parts.gemma2], [parts.tokenizer], path, False,
                           dict(layout.SCHEDULER_CONFIG), {}, compute_vae_id(parts.ae), parts.metadata)

    def parts(self):
        from .weights import LuminaParts

        b = self.bundle
        return LuminaParts(b.denoiser, b.text_encoders[0], self.tokenizer, b.vae, {})

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        """The Alpha-VLLM single file of the denoiser (as sd-scripts' lumina_train saves), or a pipeline folder."""
        from .weights import save_diffusers_folder, save_transformer

        if diffusers:
            save_diffusers_folder(self.parts(), path, dtype=dtype)
        else:
            save_transformer(self.bundle.denoiser, path, dtype=dtype, metadata=metadata)

    # ---- set-up
    def __init__(self, bundle, args=None, *, memo_size: int = 4096, **options):
        super().__init__(bundle, args)

        def option(name: str, default: Any) -> Any:
            value = getattr(args, name, None) if args is not None else None
            value = options.get(name, value)
            return default if value is None else value

        self.max_length = int(option("gemma2_max_token_length", DEFAULT_MAX_LENGTH))
        if self.max_length % 8:
            raise OptionError(f"option 'gemma2_max_token_length': {self.max_length} is not a multiple of 8 (Gemma "
                              f"tokens are padded to multiples of 8, as sd-scripts does); use e.g. "
                              f"{-(-self.max_length // 8) * 8}")
        system = str(option("system_prompt", "") or "")
        self.system_prefix = f"{system} {PROMPT_START} " if system else ""
        self.timestep_sampling = option("timestep_sampling", DEFAULT_TIMESTEP_SAMPLING)
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise OptionError(f"option 'timestep_sampling': {self.timestep_sampling!r} is not one of "
                              f"{', '.join(TIMESTEP_SAMPLINGS)}")
        self.sigmoid_scale = float(option("sigmoid_scale", fm.DEFAULT_SIGMOID_SCALE))
        self.model_prediction_type = option("model_prediction_type", DEFAULT_MODEL_PREDICTION_TYPE)
        self.discrete_flow_shift = float(option("discrete_flow_shift", DEFAULT_DISCRETE_FLOW_SHIFT))
        self.weighting_scheme = option("weighting_scheme", fm.DEFAULT_WEIGHTING_SCHEME)
        self.logit_mean = float(option("logit_mean", fm.DEFAULT_LOGIT_MEAN))
        self.logit_std = float(option("logit_std", fm.DEFAULT_LOGIT_STD))
        self.mode_scale = float(option("mode_scale", fm.DEFAULT_MODE_SCALE))
        self.ip_noise_gamma = option("ip_noise_gamma", None)
        self.ip_noise_gamma_random_strength = bool(option("ip_noise_gamma_random_strength", False))
        self.use_flash_attn = bool(option("use_flash_attn", False))
        if self.use_flash_attn:
            check_flash_attention()
        loss_options = SimpleNamespace(**{n: option(n, None) for n in LOSS_OPTIONS})
        self.loss_settings = LossSettings.from_args(loss_options, has_ddpm_schedule=False,
                                                    label=f"a {self.spec.label} model")
        self.init_memo(memo_size)
        self.tokenizer = bundle.tokenizers[0]

    @property
    def gemma2(self):
        return self.bundle.text_encoders[0]

    # ---- text
    def tokenize(self, captions: list[str], negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [B, L]: the system prompt before each caption (not before negative prompts), right-padded to
        max_length (a multiple of 8) (sd-scripts' LuminaTokenizeStrategy)."""
        texts = list(captions) if negative else [self.system_prefix + c for c in captions]
        out = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                             pad_to_multiple_of=8, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> LuminaConditioning:
        gemma = self.gemma2
        ids, mask = ids.to(gemma.device), mask.to(gemma.device)
        states = gemma(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        return LuminaConditioning(states.hidden_states[-2], mask, ids)

    def encode_batch(self, captions: list[str]) -> LuminaConditioning:
        return self.encode_ids(*self.tokenize(captions))

    # ---- text-encoder output cache files (training/te_cache.py), sd-scripts' keys
    def cache_arrays(self, cond: LuminaConditioning) -> dict[str, np.ndarray]:
        """One caption's conditioning -> hidden_state [L, D] float32, attention_mask [L], input_ids [L]."""
        return {"hidden_state": cond.hidden.detach().float().cpu().numpy(),
                "attention_mask": cond.mask.detach().cpu().numpy(),
                "input_ids": cond.input_ids.detach().cpu().numpy()}

    def from_cache_arrays(self, arrays) -> LuminaConditioning | None:
        """The inverse of cache_arrays; None when the arrays do not fit this model and token length."""
        try:
            hidden, mask, ids = (np.asarray(arrays[k]) for k in ("hidden_state", "attention_mask", "input_ids"))
        except KeyError:
            return None
        length = self.max_length
        width = self.bundle.denoiser.config.cap_feat_dim
        if hidden.shape != (length, width) or mask.shape != (length,) or ids.shape != (length,):
            return None
        device = self._text_device()
        return LuminaConditioning(torch.from_numpy(hidden.copy()).to(device),
                                  torch.from_numpy(mask.astype(np.int64)).to(device),
                                  torch.from_numpy(ids.astype(np.int64)).to(device))

    def _text_device(self) -> torch.device:
        gemma = self.gemma2
        return gemma.device if gemma is not None else next(self.bundle.denoiser.parameters()).device

    # ---- the training step
    def noised(self, latents: torch.Tensor, generator: torch.Generator | None,
               timesteps: torch.Tensor | None = None) -> NoisedLatents:
        """Noise, then sigmas (`sample_sigmas`; given timesteps: t / 1000), the input perturbation (ip_noise_gamma:
        the noisy input only); target x0 - noise; loss weights of the weighting scheme with sigma_scaled."""
        device = latents.device
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device, latents.dtype)
        if timesteps is not None:
            sigmas, timesteps = fm.sigmas_of_timesteps(timesteps, device=device)
        else:
            sigmas, timesteps = sample_sigmas(
                self.timestep_sampling, latents.shape[0], latent_height=latents.shape[2],
                latent_width=latents.shape[3], sigmoid_scale=self.sigmoid_scale,
                discrete_flow_shift=self.discrete_flow_shift, weighting_scheme=self.weighting_scheme,
                logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
                generator=generator, device=device)
        model_input_noise = perturbed_noise(noise, self.ip_noise_gamma, self.ip_noise_gamma_random_strength,
                                            generator=generator)
        noisy = fm.add_flow_noise(latents, model_input_noise, sigmas)
        weights = fm.loss_weighting(self.weighting_scheme, sigmas) \
            if self.model_prediction_type == "sigma_scaled" else None
        return NoisedLatents(noisy, timesteps, lumina_target(latents, noise), weights, self.loss_settings.loss_type,
                             self.loss_settings.thresholds(timesteps, fm.NUM_TRAIN_TIMESTEPS))

    def predict(self, noised: NoisedLatents, conditioning: LuminaConditioning, batch: dict) -> torch.Tensor:
        """The denoiser at t = 1 - sigma on the caption states (padding masked), with model_prediction_type."""
        noisy = noised.noisy
        cond = conditioning.to(noisy.device)
        sigmas = noised.timesteps.float() / fm.NUM_TRAIN_TIMESTEPS
        with flash_attention() if self.use_flash_attn else nullcontext():
            pred = self.bundle.denoiser(hidden_states=noisy, timestep=lumina_time(sigmas).to(noisy.dtype),
                                        encoder_hidden_states=cond.hidden.to(noisy.dtype),
                                        encoder_attention_mask=cond.mask.bool(), return_dict=False)[0]
        pred, _weights = fm.apply_model_prediction_type(self.model_prediction_type, pred, noisy, sigmas,
                                                        self.weighting_scheme)
        return pred

    # ---- adapters
    # sd-scripts' lora_lumina type_dims: the word in a layer's file name, in its order of precedence
    _PART_DIMS = (("attn_dim", ("attention",)), ("mlp_dim", ("mlp",)), ("mod_dim", ("modulation",)),
                  ("refiner_dim", ("refiner",)))
    _EMBEDDERS = {"x_embedder": "x_embedder", "t_embedder": "time_caption_embed.timestep_embedder",
                  "cap_embedder": "time_caption_embed.caption_embedder"}
    _TRAIN_BLOCKS = {"all": None, "transformer": ("layers.",), "refiners": ("noise_refiner.", "context_refiner."),
                     "noise_refiner": ("noise_refiner.",), "context_refiner": ("context_refiner.",)}
    LORA_NETWORK_ARGS = {"train_blocks": str, "split_qkv": flag, "verbose": flag, "embedder_dims": str,
                         **{key: int for key, _ in _PART_DIMS}}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None,
                    network_args: dict | None = None) -> dict[str, Any]:
        """sd-scripts' networks/lora_lumina names: `lora_unet_` + the Alpha-VLLM module path (q/k/v one fused
        `attention_qkv` module with one shared down projection; each its own, saved block-diagonal, with
        `split_qkv`), `lora_te_` + Gemma-2's module path. Targets: every Linear in the transformer blocks (layers,
        noise / context refiners) and the final layer; `train_blocks` all | transformer | refiners | noise_refiner |
        context_refiner keeps those blocks (only 'all' keeps the final layer, as sd-scripts' name filter does).
        Ranks per layer kind `attn_dim`, `mlp_dim`, `mod_dim`, `refiner_dim` (0 leaves the kind out; the first whose
        word is in the file name wins), `embedder_dims` = [x_embedder, t_embedder, cap_embedder] adapts the
        embedders."""
        from ...networks import network_args as na

        naming = super().lora_naming(family, denoiser)
        args = dict(network_args or {})
        blocks = str(args.get("train_blocks") or "all")
        if blocks not in cls._TRAIN_BLOCKS:
            raise NetworkError(f"option 'network_args': train_blocks={blocks!r} is not one of "
                               f"{', '.join(cls._TRAIN_BLOCKS)}")
        heads = cls._TRAIN_BLOCKS[blocks]
        config = dict(denoiser.config) if denoiser is not None else dict(layout.LUMINA2_CONFIG)
        table = layout.linear_table(config)
        embedder_dims = na.dim_list(args["embedder_dims"], list(cls._EMBEDDERS), "embedder_dims") \
            if args.get("embedder_dims") else {}

        def block_layer(path: str):
            entry = table.get(path)
            if entry is None or (heads is not None and not path.startswith(heads)):
                return None
            return entry

        def embedder_of(name: str) -> str | None:
            return next((kind for kind in cls._EMBEDDERS if f"lora_unet_{kind}" in name), None)

        def embedder_layer(path: str):
            entry = table.get(path)
            if not isinstance(entry, str):
                return None
            kind = embedder_of("lora_unet_" + entry.replace(".", "_"))
            return entry if kind and embedder_dims.get(kind) else None

        def embedder_rank(name: str) -> int | None:
            kind = embedder_of(name)
            return embedder_dims.get(kind) if kind else None

        rule = na.rank_rule(layer_rank=embedder_rank if embedder_dims else None,
                            part_ranks=[(words, args.get(key)) for key, words in cls._PART_DIMS])
        naming.update(unet_name_map=block_layer, unet_block_classes=UNET_BLOCKS, te_block_classes=TE_BLOCKS,
                      te_enabled=(True,), shared_down=not flag(args.get("split_qkv", False)),
                      unet_extra_name_map=embedder_layer if any(embedder_dims.values()) else None,
                      module_rank=rule, unet_file_name_map=table.get, verbose=flag(args.get("verbose", False)))
        return naming

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list:
        """The main transformer blocks (`layers`), N of them (sd-scripts' NextDiT swaps its layers)."""
        from ...training.block_swap import SwapGroup

        return [SwapGroup("layers", denoiser.layers, blocks_to_swap)]

    # ---- metadata
    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """sd-scripts' Lumina names: no prediction type; the LoRA module is networks.lora_lumina."""
        out = dict(metadata)
        out.pop("modelspec.prediction_type", None)
        if out.get("ss_network_module") == "networks.lora":
            out["ss_network_module"] = "networks.lora_lumina"
        return effective_flow_options(out, self)

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        """Lumina samples with the flow-matching Euler scheduler, shift 6.0 (as sd-scripts), whatever is named."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.bundle.scheduler_config or layout.SCHEDULER_CONFIG)

    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """diffusers' Lumina2Pipeline around the in-memory modules, given the prompts encoded as training encodes
        them (system prompt, token length). Prompt options: --l the CFG scale (default 3.5), --n the negative prompt,
        --s steps (default 36), --w/--h, --d; CFG only while Lumina's time is below 0.25 (sd-scripts'
        cfg_trunc_ratio, given to diffusers as the share of steps it covers: `cfg_step_ratio`), renormalised to the
        conditional prediction's norm (diffusers' cfg_normalization; sd-scripts' renorm_cfg 1.0 only caps it)."""
        pipeline = self.parts().pipeline(self.scheduler(sampler))
        pipeline.set_progress_bar_config(disable=True)

        def encode(text: str, negative: bool, device) -> LuminaConditioning:
            with torch.no_grad():
                cond = self.encode_ids(*self.tokenize([text], negative=negative))
            return cond.to(device)

        def inputs(sample, device) -> dict:
            given = getattr(sample, "given", frozenset())
            scale = sample.scale if "scale" in given else DEFAULT_SAMPLE_SCALE
            steps = sample.steps if "steps" in given else DEFAULT_SAMPLE_STEPS
            positive = encode(sample.prompt, False, device)
            args: dict[str, Any] = dict(prompt=None, prompt_embeds=positive.hidden,
                                        prompt_attention_mask=positive.mask, guidance_scale=scale,
                                        num_inference_steps=steps, cfg_normalization=True,
                                        cfg_trunc_ratio=cfg_step_ratio(steps, DEFAULT_CFG_TRUNC_RATIO,
                                                                       self.bundle.scheduler_config))
            if scale > 1.0:
                negative = encode(sample.negative_prompt or "", True, device)
                args.update(negative_prompt_embeds=negative.hidden,
                            negative_prompt_attention_mask=negative.mask)
            return args

        return SamplePipeline(pipeline, inputs)


def cfg_step_ratio(steps: int, time_ratio: float, scheduler_config: dict | None = None) -> float:
    """diffusers' Lumina2Pipeline applies CFG to the first `cfg_trunc_ratio` share of the steps; sd-scripts applies
    it while Lumina's time 1 - sigma is below its cfg_trunc_ratio. The share of steps whose time is below
    `time_ratio` on the sampling schedule (sigmas linspace(1, 1/N, N) shifted by the scheduler's shift), as the
    pipeline's ratio (half a step above the count, so the comparison is exact)."""
    shift = float((scheduler_config or layout.SCHEDULER_CONFIG).get("shift", 6.0))
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    count = int(((1.0 - sigmas) < time_ratio).sum())
    return (count + 0.5) / steps


def effective_flow_options(metadata: dict[str, str], family) -> dict[str, str]:
    """The flow-matching options' ss_ keys with the values the run used (an option left unset means the family's
    default, which sd-scripts writes)."""
    for key, value in (("ss_timestep_sampling", family.timestep_sampling),
                       ("ss_model_prediction_type", family.model_prediction_type),
                       ("ss_discrete_flow_shift", family.discrete_flow_shift),
                       ("ss_gemma2_max_token_length", getattr(family, "max_length", None))):
        if metadata.get(key) == "None":
            metadata[key] = str(value)
    return metadata


# ------------------------------------------------------------------ flash attention
def check_flash_attention() -> None:
    """OptionError unless PyTorch's flash-attention kernel can run here (a CUDA device and a build with it)."""
    if not torch.cuda.is_available():
        raise OptionError("option 'use_flash_attn': the flash-attention kernel needs a CUDA GPU and none is "
                          "available here; remove the option")
    if not torch.backends.cuda.is_flash_attention_available():
        raise OptionError("option 'use_flash_attn': this PyTorch build has no flash-attention kernel; remove the "
                          "option")


def flash_attention():
    """Scaled-dot-product attention limited to the flash kernel (and memory-efficient one where a mask keeps flash
    out: the caption refiners), never the plain maths kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
