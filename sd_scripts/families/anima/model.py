"""Anima on the shared loop: loading the parts, Qwen3 + T5-token conditioning, the rectified-flow step, the DiT call,
LoRA names (sd-scripts' networks.lora_anima), per-part learning rates, block swap and our own sampler.

Conditioning (sd-scripts 48d368f `library/strategy_anima.py`): the caption is tokenised twice, by the Qwen tokenizer
(padded to `qwen3_max_token_length`, default 512) and by the T5 tokenizer (padded to `t5_max_token_length`, 512);
Qwen3's last hidden states (padding rows zeroed; the padding mask given to Qwen3) and the T5 ids with their mask
go to the DiT, whose LLM adapter makes the cross-attention context inside the forward (so it trains with the DiT).

The step (sd-scripts `anima_train_network.py`): noise, sigmas from `timestep_sampling` (default sigmoid, FLUX.1's
sampler), noisy = (1 - s) x0 + s n, the DiT gets timestep s and predicts the velocity, compared with n - x0; loss
weights of `weighting_scheme` (sigma_sqrt, cosmap; 1 otherwise). Latents are the VAE's mode normalised per channel
((z - mean) / std), as sd-scripts caches them.

Sampling (sd-scripts `anima_train_utils.do_sample`): Euler steps over sigmas linspace(1, 0, steps + 1) shifted by 3.0
or the prompt's --fs (FlowMatchEulerDiscreteScheduler with those sigmas), classifier-free guidance with the negative
prompt when the scale is above 1 (prompt defaults: 30 steps, scale 7.5), noise drawn on the CPU from the prompt's seed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import ModelLoadError, NetworkError
from ...networks.network_args import flag
from ...options import OptionError
from ...training import flow_matching as fm
from ...training.loss import LOSS_OPTIONS, LossSettings
from ..base import Family, NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from ..flow_step import FlowMatchingNoise
from . import ARCHITECTURE, IMPLEMENTATION, NAME, NETWORK_MODULE, layout

log = logging.getLogger(__name__)

TE_CACHE_SUFFIX = "_anima_te.npz"  # sd-scripts' AnimaTextEncoderOutputsCachingStrategy name
DEFAULT_TIMESTEP_SAMPLING = "sigmoid"  # anima_train_utils' defaults
DEFAULT_DISCRETE_FLOW_SHIFT = 1.0
SAMPLE_FLOW_SHIFT = 3.0
DEFAULT_LENGTH = 512
# sd-scripts' lora_anima: the DiT's blocks (and with include_patterns the embedders / final layer), the adapter's
# blocks with train_llm_adapter, Qwen3's attention and MLP; this default exclusion applies to the full names
DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"
DIT_BLOCKS = ("CosmosTransformerBlock",)
ADAPTER_BLOCKS = ("AdapterBlock",)
TE_BLOCKS = ("Qwen3Attention", "Qwen3MLP")


@dataclass
class AnimaConditioning:
    """Qwen3 last hidden states [B, Lq, D] (padding rows zero), their mask [B, Lq], the T5 ids [B, Lt] and mask."""

    qwen: torch.Tensor
    qwen_mask: torch.Tensor
    t5_ids: torch.Tensor
    t5_mask: torch.Tensor

    def to(self, *args, **kwargs) -> "AnimaConditioning":
        qwen = self.qwen.to(*args, **kwargs)
        return AnimaConditioning(qwen, self.qwen_mask.to(qwen.device), self.t5_ids.to(qwen.device),
                                 self.t5_mask.to(qwen.device))

    def __len__(self) -> int:
        return self.qwen.shape[0]

    def __getitem__(self, index: int) -> "AnimaConditioning":
        return AnimaConditioning(self.qwen[index], self.qwen_mask[index], self.t5_ids[index], self.t5_mask[index])

    @staticmethod
    def stack(items: Sequence["AnimaConditioning"]) -> "AnimaConditioning":
        return AnimaConditioning(*(torch.stack([getattr(i, f) for i in items])
                                   for f in ("qwen", "qwen_mask", "t5_ids", "t5_mask")))


def _latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1)
    return mean, std


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] -> images [B, 3, H, W] in [-1, 1]."""
    mean, std = _latent_stats(vae, latents.device, torch.float32)
    z = (latents.float() * std + mean).to(vae.dtype)
    return vae.decode(z.unsqueeze(2)).sample.squeeze(2).float()


class AnimaSampler:
    """A diffusers-pipeline-like sampler: call with prompt, negative_prompt, width, height, num_inference_steps,
    guidance_scale, generator -> `.images` (PIL). `scheduler` is a FlowMatchEulerDiscreteScheduler."""

    def __init__(self, family: "AnimaFamily", scheduler):
        self.family, self.scheduler = family, scheduler

    def set_progress_bar_config(self, **_kwargs) -> None:
        pass

    def __call__(self, *, prompt: str, negative_prompt: str = "", width: int = 512, height: int = 512,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, generator=None, output_type="pil",
                 flow_shift: float | None = None, **_ignored):
        from PIL import Image

        family = self.family
        dit, vae = family.bundle.denoiser, family.bundle.vae
        device = next(dit.parameters()).device
        height, width = max(64, height - height % 16), max(64, width - width % 16)
        use_cfg = guidance_scale > 1.0
        cond = family.encode_captions([prompt] + ([negative_prompt or ""] if use_cfg else []),
                                      train_text_encoder=False).to(device)
        dtype = cond.qwen.dtype if not torch.is_autocast_enabled() else torch.get_autocast_dtype(device.type)
        context = dit.context(cond.qwen, cond.qwen_mask, cond.t5_ids, cond.t5_mask)
        shape = (1, vae.config.z_dim, height // 8, width // 8)
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        steps = int(num_inference_steps)
        if flow_shift is not None:  # the prompt's --fs
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=flow_shift)
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=device)
        for t in self.scheduler.timesteps:
            sigma = (t / fm.NUM_TRAIN_TIMESTEPS).reshape(1).to(device)
            inputs = x.to(dtype)
            if use_cfg:
                pos = dit(inputs, sigma, None, context=context[:1]).float()
                neg = dit(inputs, sigma, None, context=context[1:]).float()
                v = neg + guidance_scale * (pos - neg)
            else:
                v = dit(inputs, sigma, None, context=context).float()
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        image = decode_latents(vae, x)
        image = ((image[0].clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return SimpleNamespace(images=[Image.fromarray(image)])


def _flag_arg(value) -> bool:
    return flag(value)


class AnimaFamily(FlowMatchingNoise, MemoisedCaptions, Family):
    """Anima (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    # ---- loading and saving
    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, qwen3: str | None = None,
             vae: str | None = None, llm_adapter_path: str | None = None, t5_tokenizer_path: str | None = None,
             checkpoint=None, **_options):
        """The DiT single file plus --qwen3, --vae (and --llm_adapter_path), offline."""
        from ...models.bundle import ModelBundle, compute_vae_id
        from ...models.qwen_tokenizer import load_qwen_tokenizer
        from ...models.t5 import load_t5_tokenizer
        from .weights import load_parts

        path = os.fspath(path)
        if os.path.isdir(path):
            raise ModelLoadError(f"{path}: Anima is loaded from its single file (anima-preview.safetensors), not a "
                                 f"folder")
        parts = load_parts(path, qwen3=qwen3, vae=vae, llm_adapter_path=llm_adapter_path, dtype=dtype,
                           checkpoint=checkpoint)
        qwen_tok = load_qwen_tokenizer(qwen3 if qwen3 and os.path.isdir(qwen3) else None)
        bundle = ModelBundle(NAME, parts.transformer, parts.vae, [parts.qwen3],
                             [qwen_tok, load_t5_tokenizer(t5_tokenizer_path)], path, False, {}, dict(parts.extra_state),
                             compute_vae_id(parts.vae), dict(parts.metadata))
        return bundle

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        """The DiT (with the adapter) as the `net.`-prefixed single file sd-scripts' anima_train saves."""
        from .weights import save_transformer

        if diffusers:
            raise OptionError("option 'save_model_as': diffusers has no Anima pipeline, so Anima is saved as a "
                              "single .safetensors file: use save_model_as safetensors")
        save_transformer(self.bundle.denoiser, path, dtype=dtype, metadata=metadata, extra=self.bundle.extra_state)

    # ---- set-up
    def __init__(self, bundle, args=None, *, memo_size: int = 4096, **options):
        super().__init__(bundle, args)

        def option(name: str, default: Any) -> Any:
            value = getattr(args, name, None) if args is not None else None
            value = options.get(name, value)
            return default if value is None else value

        self.qwen_length = int(option("qwen3_max_token_length", DEFAULT_LENGTH))
        self.t5_length = int(option("t5_max_token_length", DEFAULT_LENGTH))
        self.max_length = (self.qwen_length, self.t5_length)
        self.timestep_sampling = option("timestep_sampling", DEFAULT_TIMESTEP_SAMPLING)
        self.sigmoid_scale = float(option("sigmoid_scale", fm.DEFAULT_SIGMOID_SCALE))
        self.discrete_flow_shift = float(option("discrete_flow_shift", DEFAULT_DISCRETE_FLOW_SHIFT))
        self.weighting_scheme = option("weighting_scheme", fm.DEFAULT_WEIGHTING_SCHEME)
        self.logit_mean = float(option("logit_mean", fm.DEFAULT_LOGIT_MEAN))
        self.logit_std = float(option("logit_std", fm.DEFAULT_LOGIT_STD))
        self.mode_scale = float(option("mode_scale", fm.DEFAULT_MODE_SCALE))
        self.ip_noise_gamma = option("ip_noise_gamma", None)
        self.ip_noise_gamma_random_strength = bool(option("ip_noise_gamma_random_strength", False))
        if str(option("save_model_as", "")).startswith("diffusers") and \
                getattr(args, "trainer_kind", None) in ("finetune", "db"):
            raise OptionError("option 'save_model_as': diffusers has no Anima pipeline, so Anima is saved as a "
                              "single .safetensors file: use save_model_as safetensors")
        attn = option("attn_mode", "torch")
        if attn not in ("torch", "sdpa"):
            log.warning("option 'attn_mode' %s: attention runs through PyTorch's scaled-dot-product attention here "
                        "(it picks flash / memory-efficient kernels itself)", attn)
        loss_options = SimpleNamespace(**{n: option(n, None) for n in LOSS_OPTIONS})
        self.loss_settings = LossSettings.from_args(loss_options, has_ddpm_schedule=False, label="an Anima model")
        self.init_memo(memo_size)
        self.qwen_tokenizer, self.t5_tokenizer = bundle.tokenizers[0], bundle.tokenizers[1]

    # ---- latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> the VAE's mode, normalised per channel (sd-scripts' cached latents)."""
        vae = self.bundle.vae
        z = vae.encode(images.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode().squeeze(2).float()
        mean, std = _latent_stats(vae, z.device, torch.float32)
        return (z - mean) / std

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float()

    # ---- text
    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        q = self.qwen_tokenizer(captions, padding="max_length", max_length=self.qwen_length, truncation=True,
                                return_tensors="pt")
        t = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                              return_tensors="pt")
        return q.input_ids, q.attention_mask, t.input_ids, t.attention_mask

    def encode_batch(self, captions: list[str]) -> AnimaConditioning:
        qwen = self.bundle.text_encoders[0]
        ids, mask, t5_ids, t5_mask = self.tokenize(captions)
        mask = mask.to(qwen.device)
        states = qwen(input_ids=ids.to(qwen.device), attention_mask=mask).last_hidden_state
        states = states * mask.to(states.dtype)[..., None]
        return AnimaConditioning(states, mask, t5_ids.to(states.device), t5_mask.to(states.device))

    def cache_arrays(self, cond: AnimaConditioning) -> dict[str, np.ndarray]:
        """sd-scripts' `_anima_te.npz` keys (caption_dropout_rate 0: captions are fixed when cached here)."""
        return {"prompt_embeds": cond.qwen.detach().float().cpu().numpy(),
                "attn_mask": cond.qwen_mask.detach().cpu().numpy().astype(np.int64),
                "t5_input_ids": cond.t5_ids.detach().cpu().numpy().astype(np.int32),
                "t5_attn_mask": cond.t5_mask.detach().cpu().numpy().astype(np.int32),
                "caption_dropout_rate": np.array(0.0, dtype=np.float32)}

    def from_cache_arrays(self, arrays) -> AnimaConditioning | None:
        try:
            qwen, mask = np.asarray(arrays["prompt_embeds"]), np.asarray(arrays["attn_mask"])
            ids, t5_mask = np.asarray(arrays["t5_input_ids"]), np.asarray(arrays["t5_attn_mask"])
        except KeyError:
            return None
        width = self.bundle.denoiser.llm_adapter.config["source_dim"]
        if qwen.shape != (self.qwen_length, width) or ids.shape != (self.t5_length,):
            return None
        device = next(self.bundle.denoiser.parameters()).device
        return AnimaConditioning(torch.from_numpy(qwen.copy()).to(device),
                                 torch.from_numpy(mask.astype(np.int64)).to(device),
                                 torch.from_numpy(ids.astype(np.int64)).to(device),
                                 torch.from_numpy(t5_mask.astype(np.int64)).to(device))

    # ---- the training step
    def predict(self, noised: NoisedLatents, conditioning: AnimaConditioning, batch: dict) -> torch.Tensor:
        noisy = noised.noisy
        cond = conditioning.to(noisy.device)
        sigmas = noised.timesteps.float() / fm.NUM_TRAIN_TIMESTEPS
        return self.bundle.denoiser(noisy, sigmas, cond.qwen, qwen_mask=cond.qwen_mask, t5_ids=cond.t5_ids,
                                    t5_mask=cond.t5_mask)

    # ---- adapters
    LORA_NETWORK_ARGS = {"train_llm_adapter": _flag_arg, "exclude_patterns": str, "include_patterns": str,
                         "network_reg_dims": str, "network_reg_lrs": str, "verbose": _flag_arg}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None,
                    network_args: dict | None = None) -> dict[str, Any]:
        """sd-scripts' networks/lora_anima names: `lora_unet_` + the MiniTrainDIT module path
        (`lora_unet_blocks_0_self_attn_q_proj`, `..._cross_attn_output_proj`, `..._mlp_layer1`), with
        train_llm_adapter also `lora_unet_llm_adapter_blocks_0_...`; `lora_te_` + Qwen3's path
        (`lora_te_layers_0_self_attn_q_proj`). Targets: every Linear of the DiT blocks except those the default
        pattern `.*(_modulation|_norm|_embedder|final_layer).*` or `exclude_patterns` match in the full name
        (`include_patterns` win; they also reach the embedders and the final layer); `network_reg_dims`
        "regex=rank,..." and `network_reg_lrs` "regex=lr,..." (full match on the full name) set the DiT modules'
        ranks and learning rates (a group per rate)."""
        naming = super().lora_naming(family, denoiser)
        args = dict(network_args or {})
        exclude = [re.compile(DEFAULT_EXCLUDE)] + [re.compile(p) for p in _patterns(args.get("exclude_patterns"),
                                                                                      "exclude_patterns")]
        include = [re.compile(p) for p in _patterns(args.get("include_patterns"), "include_patterns")]
        reg_dims = _reg_dims(args.get("network_reg_dims"))
        reg_lrs = _reg_dims(args.get("network_reg_lrs"), float, "network_reg_lrs", "learning rate")
        originals: dict[str, str] = {}

        def remembered(path: str) -> str | None:
            name = layout.to_file_path(path)
            if name is not None:
                originals["lora_unet_" + name.replace(".", "_")] = name
            return name

        def selected(name: str) -> bool:
            return not any(p.fullmatch(name) for p in exclude) or any(p.fullmatch(name) for p in include)

        def in_blocks(path: str) -> str | None:
            name = remembered(path)
            return name if name is not None and selected(name) else None

        def outside(path: str) -> str | None:
            name = remembered(path)
            if name is None or name.startswith(layout.ADAPTER):
                return None
            return name if any(p.fullmatch(name) for p in include) else None

        def rank(file_name: str) -> int | None:
            name = originals.get(file_name)
            return next((d for p, d in reg_dims if name is not None and p.fullmatch(name)), None)

        def rate(file_name: str) -> float | None:
            name = originals.get(file_name)
            return next((r for p, r in reg_lrs if name is not None and p.fullmatch(name)), None)

        train_adapter = flag(args.get("train_llm_adapter", False))
        naming.update(unet_name_map=in_blocks, unet_block_classes=DIT_BLOCKS + (ADAPTER_BLOCKS if train_adapter
                                                                               else ()),
                      te_block_classes=TE_BLOCKS, unet_extra_name_map=outside if include else None,
                      unet_file_name_map=remembered, module_rank=rank if reg_dims else None,
                      verbose=flag(args.get("verbose", False)))
        if reg_lrs:
            naming["module_lr"] = rate
        return naming

    # ---- full fine-tuning
    @classmethod
    def denoiser_param_groups(cls, denoiser: torch.nn.Module, args) -> list[tuple[str, list, float]] | None:
        """anima_train's per-part rates (llm_adapter_lr, self_attn_lr, cross_attn_lr, mlp_lr, mod_lr; unset = the
        learning_rate, 0 = frozen): (group name, parameters, rate), the parts told by the MiniTrainDIT names as
        sd-scripts' get_anima_param_groups tells them."""
        base = float(args.learning_rate)
        rates = {part: getattr(args, f"{part}_lr", None) for part in ("self_attn", "cross_attn", "mlp", "mod",
                                                                     "llm_adapter")}
        if all(v is None for v in rates.values()):
            return None
        groups: dict[str, list] = {k: [] for k in ("base", "self_attn", "cross_attn", "mlp", "mod", "llm_adapter")}
        for path, param in denoiser.named_parameters():
            if not param.requires_grad:
                continue
            name = layout.to_file_path(path) or path
            part = "llm_adapter" if "llm_adapter" in name else "self_attn" if ".self_attn" in name else \
                "cross_attn" if ".cross_attn" in name else "mlp" if ".mlp" in name else \
                "mod" if ".adaln_modulation" in name else "base"
            groups[part].append(param)
        return [(part, params, base if rates.get(part) is None else float(rates[part]))
                for part, params in groups.items() if params]

    @classmethod
    def trainable_text_encoders(cls, args) -> tuple[bool, ...]:
        """Qwen3 stays frozen: sd-scripts' anima_train trains the DiT and its LLM adapter only."""
        return (False,)

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list:
        """The DiT's blocks, N of them (at most all but two, as sd-scripts' Anima.enable_block_swap)."""
        from ...training.block_swap import SwapGroup

        count = len(denoiser.transformer_blocks)
        if blocks_to_swap > count - 2:
            raise OptionError(f"option 'blocks_to_swap' {blocks_to_swap}: this Anima model has {count} blocks, so at "
                              f"most {count - 2} can be swapped")
        return [SwapGroup("transformer_blocks", denoiser.transformer_blocks, blocks_to_swap)]

    # ---- metadata
    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """sd-scripts' Anima names: architecture anima-preview (adapter suffix kept), its implementation,
        ss_network_module networks.lora_anima for our LoRA, the family's sampling defaults where unset."""
        out = dict(metadata)
        if "modelspec.architecture" in out:
            _, slash, adapter = out["modelspec.architecture"].partition("/")
            out["modelspec.architecture"] = ARCHITECTURE + (slash + adapter if slash else "")
            out["modelspec.implementation"] = IMPLEMENTATION
        if out.get("ss_network_module") == "networks.lora":
            out["ss_network_module"] = NETWORK_MODULE
        for key, value in (("ss_timestep_sampling", self.timestep_sampling),
                           ("ss_discrete_flow_shift", self.discrete_flow_shift)):
            if out.get(key) in (None, "None") and key in out:
                out[key] = str(value)
        return out

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        """Euler over shifted sigmas (shift 3.0) whatever sampler a prompt names, as sd-scripts samples Anima."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=fm.NUM_TRAIN_TIMESTEPS, shift=SAMPLE_FLOW_SHIFT)

    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        sampler_ = AnimaSampler(self, self.scheduler(sampler))
        return SamplePipeline(sampler_, lambda sample, device: dict(
            prompt=sample.prompt, negative_prompt=sample.negative_prompt or "",
            flow_shift=getattr(sample, "flow_shift", None)))


def _patterns(text, key: str) -> list[str]:
    """sd-scripts' exclude_patterns / include_patterns: a Python list literal of regular expressions (or one)."""
    if text is None or text == "":
        return []
    import ast

    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError):
        value = str(text)
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        try:
            re.compile(str(item))
        except re.error as e:
            raise NetworkError(f"option 'network_args': {key}: {item!r} is not a regular expression ({e})") from None
    return [str(i) for i in items]


def _reg_dims(text, kind=int, key: str = "network_reg_dims", what: str = "rank") -> list[tuple[re.Pattern, Any]]:
    """sd-scripts' "regex=value,regex=value" (network_reg_dims: ranks, network_reg_lrs: learning rates)."""
    if not text:
        return []
    out = []
    for pair in str(text).split(","):
        if not pair.strip():
            continue
        pattern, eq, value = pair.strip().rpartition("=")
        try:
            out.append((re.compile(pattern), kind(value)))
        except (re.error, ValueError):
            raise NetworkError(f"option 'network_args': {key}: {pair.strip()!r} is not 'regular expression="
                               f"{what}'") from None
    return out
