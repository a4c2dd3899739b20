"""HunyuanImage-2.1 on the shared loop: loading the part files, Qwen2.5-VL + byT5 conditioning, the flow-matching
step, the DiT call, LoRA names and the sample pipeline.

Conditioning (sd-scripts 48d368f `library/hunyuan_image_text_encoder.py`, `strategy_hunyuan_image.py`; diffusers'
HunyuanImagePipeline computes the same):
- Qwen2.5-VL: the caption inside the system/user template (without the assistant turn), at most 1024 + 34 tokens,
  padded to the longest caption of the batch; hidden states of the third-last layer, the first 34 positions (the
  template's system part and '<|im_start|>user\\n') dropped with their mask. Each caption keeps only its own tokens
  (`HunyuanConditioning.__getitem__`); a batch is padded to its longest caption again (`stack`), as sd-scripts
  pads a batch.
- byT5: the text inside double quotes and Chinese single / double quotes of the caption (not ASCII single quotes,
  as sd-scripts; diffusers' pipeline also takes those, so samples are encoded here), formatted as
  'Text "a". Text "b". ', 128 tokens; a caption without quoted text gives zeros and an all-zero mask (the DiT then
  ignores it).
The step: noise, sigmas from `timestep_sampling` (sigma / uniform / sigmoid / shift / flux_shift, `discrete_flow_shift`
5.0), noisy = (1 - s) x0 + s n, target n - x0; the DiT gets timestep floor(s * 1000) (sd-scripts casts to int64);
`model_prediction_type` (default raw) applied to its output.
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

from ...errors import ModelLoadError
from ...networks.network_args import flag
from ...training import flow_matching as fm
from ...training.loss import LOSS_OPTIONS, LossSettings
from ..base import Family, NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from ..flow_step import FlowMatchingNoise
from . import ARCHITECTURE, BASE_MODEL_VERSION, NAME, layout

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                   "{}<|im_end|>")
TEMPLATE_TOKENS = 34  # the template's tokens before the caption, dropped from the encoder's output
QWEN_MAX_LENGTH = 1024
QWEN_SKIP_LAYERS = 2  # hidden_states[-(2 + 1)]
BYT5_MAX_LENGTH = 128
TE_CACHE_SUFFIX = "_hi_te.npz"  # sd-scripts' HunyuanImageTextEncoderOutputsCachingStrategy
DEFAULT_DISCRETE_FLOW_SHIFT = 5.0  # hunyuan_image_train_network.py's defaults
DEFAULT_MODEL_PREDICTION_TYPE = "raw"
SAMPLE_STEPS, SAMPLE_SCALE, SAMPLE_FLOW_SHIFT = 20, 3.5, 5.0  # sd-scripts' sample defaults
APG_START_STEP, APG_START_STEP_OCR = 5, 38
DOUBLE_BLOCKS = ("HunyuanImageTransformerBlock",)
SINGLE_BLOCKS = ("HunyuanImageSingleTransformerBlock",)
_GLYPH_PATTERNS = (re.compile(r"\"(.*?)\""), re.compile(r"‘(.*?)’"), re.compile(r"“(.*?)”"))


def glyph_text(caption: str) -> str | None:
    """The byT5 input of a caption: its quoted texts (double quotes, then Chinese single, then Chinese double
    quotes, as sd-scripts collects them) as 'Text "..". ' each; None without quoted text."""
    texts = [t for rx in _GLYPH_PATTERNS for t in rx.findall(caption)]
    return "".join(f'Text "{t}". ' for t in texts) if texts else None


@dataclass
class HunyuanConditioning:
    """Qwen2.5-VL states [B, L, D] with their mask [B, L], byT5 states [B, 128, Db] with their mask [B, 128]."""

    vl: torch.Tensor
    vl_mask: torch.Tensor
    byt5: torch.Tensor
    byt5_mask: torch.Tensor

    def to(self, *args, **kwargs) -> "HunyuanConditioning":
        vl = self.vl.to(*args, **kwargs)
        return HunyuanConditioning(vl, self.vl_mask.to(vl.device), self.byt5.to(*args, **kwargs),
                                   self.byt5_mask.to(vl.device))

    def __len__(self) -> int:
        return self.vl.shape[0]

    def __getitem__(self, index: int) -> "HunyuanConditioning":
        """One caption's conditioning, its Qwen part cut to its own tokens (no batch dimension)."""
        n = int(self.vl_mask[index].sum())
        return HunyuanConditioning(self.vl[index, :n], self.vl_mask[index, :n], self.byt5[index],
                                   self.byt5_mask[index])

    @staticmethod
    def stack(items: Sequence["HunyuanConditioning"]) -> "HunyuanConditioning":
        """Items -> a batch, the Qwen part padded (zeros, mask 0) to the longest."""
        longest = max(i.vl.shape[0] for i in items)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[0]))  # noqa: E731
        pad_mask = lambda t: torch.nn.functional.pad(t, (0, longest - t.shape[0]))  # noqa: E731
        return HunyuanConditioning(torch.stack([pad(i.vl) for i in items]),
                                   torch.stack([pad_mask(i.vl_mask) for i in items]),
                                   torch.stack([i.byt5 for i in items]), torch.stack([i.byt5_mask for i in items]))


# ------------------------------------------------------------------ loading
def load_bundle(path: str, *, dtype: torch.dtype = torch.float32, text_encoder: str | None = None,
                byt5: str | None = None, vae: str | None = None, checkpoint=None):
    """A HunyuanImage-2.1 ModelBundle: the official / ComfyUI DiT file with --text_encoder, --byt5 and --vae, or a
    HunyuanImagePipeline folder (its parts replaced by any of those options). Every part file's header is checked
    before weights are read."""
    from ...models.bundle import ModelBundle, compute_vae_id
    from ...models.qwen_tokenizer import load_qwen_tokenizer
    from . import weights

    path = os.fspath(path)
    folder = os.path.isdir(path)
    if folder and not weights.is_pipeline_folder(path):
        raise ModelLoadError(f"{path}: not a diffusers HunyuanImagePipeline folder (model_index.json); pass the "
                             f"hunyuanimage2.1.safetensors file or such a folder")
    given = {"text_encoder": text_encoder, "byt5": byt5, "vae": vae}
    for option, value in given.items():
        if value:
            weights.check_file(value, option)
        elif not folder:
            _kind, wanted, example = weights.FILE_OPTIONS[option]
            raise ModelLoadError(f"{path}: the DiT file holds only the denoiser; pass {wanted} too (--{option} "
                                 f"{example}), or a diffusers HunyuanImagePipeline folder")
    if not folder:
        weights.check_file(path, "pretrained_model_name_or_path")
    dit = weights.load_dit(path, dtype, checkpoint if not folder else None)
    qwen = weights.load_qwen(text_encoder or path, dtype)
    byt5_model = weights.load_byt5(byt5 or path, dtype)
    vae_model = weights.load_vae(vae or path, dtype)
    metadata = dict(getattr(checkpoint, "metadata", None) or {}) if checkpoint is not None else {}
    tokenizers = [load_qwen_tokenizer(), weights.load_byt5_tokenizer()]
    return ModelBundle(NAME, dit, vae_model, [qwen, byt5_model], tokenizers, path, False,
                       dict(layout.SCHEDULER_CONFIG), {}, compute_vae_id(vae_model), metadata)


class HunyuanSampler:
    """diffusers' HunyuanImagePipeline around the in-memory modules, called with this family's own prompt encodings
    (so samples see what training sees) and the adaptive projected guidance sd-scripts samples with."""

    def __init__(self, family: "HunyuanImageFamily", scheduler):
        from diffusers import HunyuanImagePipeline

        b = family.bundle
        self.family = family
        self.pipeline = HunyuanImagePipeline(scheduler=scheduler, vae=b.vae, text_encoder=None,
                                             tokenizer=b.tokenizers[0], text_encoder_2=None,
                                             tokenizer_2=b.tokenizers[1], transformer=b.denoiser)
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.pipeline.scheduler = value

    def __call__(self, *, prompt: str, negative_prompt: str = "", guidance_scale: float = SAMPLE_SCALE,
                 width: int = 512, height: int = 512, **kwargs):
        from diffusers.guiders import AdaptiveProjectedMixGuidance

        enabled = guidance_scale != 1.0
        self.pipeline.guider = AdaptiveProjectedMixGuidance(
            guidance_scale=guidance_scale, adaptive_projected_guidance_start_step=APG_START_STEP, enabled=enabled)
        self.pipeline.ocr_guider = AdaptiveProjectedMixGuidance(
            guidance_scale=guidance_scale, adaptive_projected_guidance_start_step=APG_START_STEP_OCR, enabled=enabled)
        device = self.family.bundle.denoiser.device
        dtype = next(self.family.bundle.denoiser.parameters()).dtype
        cond = self.family.encode_batch([prompt]).to(device, dtype)
        neg = self.family.encode_batch([negative_prompt or ""]).to(device, dtype)
        step = 32  # sd-scripts rounds to 16; the 32x VAE and the pipeline need multiples of 32
        return self.pipeline(prompt_embeds=cond.vl, prompt_embeds_mask=cond.vl_mask, prompt_embeds_2=cond.byt5,
                             prompt_embeds_mask_2=cond.byt5_mask, negative_prompt_embeds=neg.vl,
                             negative_prompt_embeds_mask=neg.vl_mask, negative_prompt_embeds_2=neg.byt5,
                             negative_prompt_embeds_mask_2=neg.byt5_mask, width=max(64, width - width % step),
                             height=max(64, height - height % step), distilled_guidance_scale=None, **kwargs)


# ------------------------------------------------------------------ the family
class HunyuanImageFamily(FlowMatchingNoise, MemoisedCaptions, Family):
    """HunyuanImage-2.1 (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype = torch.float32, text_encoder: str | None = None,
             byt5: str | None = None, vae: str | None = None, checkpoint=None, **_options):
        return load_bundle(path, dtype=dtype, text_encoder=text_encoder, byt5=byt5, vae=vae, checkpoint=checkpoint)

    def save_checkpoint(self, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                        diffusers: bool) -> None:
        from .weights import save_dit

        if diffusers:
            raise NotImplementedError("HunyuanImage-2.1 is trained with LoRA only (as sd-scripts)")
        save_dit(self.bundle.denoiser, path, dtype=dtype, metadata=metadata)

    def __init__(self, bundle, args=None, *, memo_size: int = 4096, **options):
        super().__init__(bundle, args)

        def option(name: str, default: Any) -> Any:
            value = options.get(name, getattr(args, name, None) if args is not None else None)
            return default if value is None else value

        self.timestep_sampling = option("timestep_sampling", fm.DEFAULT_TIMESTEP_SAMPLING)
        self.sigmoid_scale = float(option("sigmoid_scale", fm.DEFAULT_SIGMOID_SCALE))
        self.model_prediction_type = option("model_prediction_type", DEFAULT_MODEL_PREDICTION_TYPE)
        self.discrete_flow_shift = float(option("discrete_flow_shift", DEFAULT_DISCRETE_FLOW_SHIFT))
        self.weighting_scheme = option("weighting_scheme", fm.DEFAULT_WEIGHTING_SCHEME)
        self.logit_mean = float(option("logit_mean", fm.DEFAULT_LOGIT_MEAN))
        self.logit_std = float(option("logit_std", fm.DEFAULT_LOGIT_STD))
        self.mode_scale = float(option("mode_scale", fm.DEFAULT_MODE_SCALE))
        self.ip_noise_gamma = option("ip_noise_gamma", None)
        self.ip_noise_gamma_random_strength = bool(option("ip_noise_gamma_random_strength", False))
        loss_options = SimpleNamespace(**{n: option(n, None) for n in LOSS_OPTIONS})
        self.loss_settings = LossSettings.from_args(loss_options, has_ddpm_schedule=False,
                                                    label=f"a {self.spec.label} model")
        self.split_attn = bool(option("split_attn", False))
        attn_mode = option("attn_mode", "torch")
        if attn_mode not in ("torch", "sdpa"):
            log.warning("attn_mode %s: PyTorch scaled-dot-product attention is used (it picks flash / memory-efficient "
                        "kernels itself)", attn_mode)
        self.text_encoder_cpu = bool(option("text_encoder_cpu", False))
        if self.text_encoder_cpu:
            for te in bundle.text_encoders:
                if te is not None:
                    te.to("cpu")
        if option("fp8_vl", False) and bundle.text_encoders[0] is not None:
            self._qwen_in_fp8(option("mixed_precision", "no"))
        if getattr(bundle.denoiser, "gradient_checkpointing", False):
            checkpoint_with_keywords(bundle.denoiser)
        if option("vae_chunk_size", None):  # decode in tiles: the memory saving sd-scripts' chunked convs give
            bundle.vae.enable_tiling()
        self.byt5_width = int(bundle.denoiser.config.text_embed_2_dim)
        self.vl_width = int(bundle.denoiser.config.text_embed_dim)
        self.qwen_tokenizer, self.byt5_tokenizer = bundle.tokenizers[:2]
        self.init_memo(memo_size)

    def _qwen_in_fp8(self, mixed_precision: str) -> None:
        """fp8_vl: Qwen2.5-VL's Linear / Embedding weights stored in float8, computed in the mixed precision
        (training/fp8.py; sd-scripts computes it in bf16)."""
        from ...options import OptionError
        from ...training import fp8

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        if compute is None:
            raise OptionError("option 'fp8_vl' computes the text encoder in the mixed precision: set mixed_precision "
                              "to bf16 (or fp16), or remove fp8_vl")
        qwen = self.bundle.text_encoders[0]
        fp8.check_fp8_device(next(qwen.parameters()).device, compute)
        qwen.to(compute)
        fp8.store_in_fp8(qwen, compute)

    @property
    def max_length(self) -> int:
        return QWEN_MAX_LENGTH

    def sample_modules(self) -> list[torch.nn.Module]:
        """The modules sampling puts on the device (text_encoder_cpu: the text encoders stay on the CPU)."""
        b = self.bundle
        encoders = [] if self.text_encoder_cpu else list(b.text_encoders)
        return [m for m in (b.denoiser, b.vae, *encoders) if m is not None]

    # ---- latents: the VAE's plain latents (no shift), scaled by 0.75289 (the spec)
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.bundle.vae
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample().float()

    # ---- text
    def tokenize(self, captions: list[str]):
        """Qwen ids and mask [B, 34 + L] (padded to the longest), byT5 ids and mask [B, 128] and, per caption,
        whether it has glyph text."""
        q = self.qwen_tokenizer([PROMPT_TEMPLATE.format(c) for c in captions], padding=True, truncation=True,
                                max_length=QWEN_MAX_LENGTH + TEMPLATE_TOKENS, return_tensors="pt")
        glyphs = [glyph_text(c) for c in captions]
        texts = [g or "" for g in glyphs]
        b = self.byt5_tokenizer(texts, padding="max_length", max_length=BYT5_MAX_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        has = torch.tensor([g is not None for g in glyphs])
        return q.input_ids, q.attention_mask, b.input_ids, b.attention_mask * has[:, None].to(torch.long), has

    def encode_batch(self, captions: list[str]) -> HunyuanConditioning:
        qwen, byt5 = self.bundle.text_encoders[:2]
        ids, mask, b_ids, b_mask, has = self.tokenize(captions)
        out = qwen(input_ids=ids.to(qwen.device), attention_mask=mask.to(qwen.device), output_hidden_states=True)
        vl = out.hidden_states[-(QWEN_SKIP_LAYERS + 1)][:, TEMPLATE_TOKENS:]
        vl_mask = mask[:, TEMPLATE_TOKENS:].to(vl.device)
        glyph = torch.zeros(len(captions), BYT5_MAX_LENGTH, self.byt5_width, device=vl.device, dtype=vl.dtype)
        if bool(has.any()):
            rows = has.nonzero().flatten()
            states = byt5(b_ids[rows].to(byt5.device), attention_mask=b_mask[rows].float().to(byt5.device))[0]
            glyph[rows.to(vl.device)] = states.to(vl.device, vl.dtype)
        return HunyuanConditioning(vl, vl_mask, glyph, b_mask.to(vl.device))

    # ---- text-encoder output cache files: sd-scripts' keys
    def cache_arrays(self, cond: HunyuanConditioning) -> dict[str, np.ndarray]:
        return {"vlm_embed": cond.vl.detach().float().cpu().numpy(),
                "vlm_mask": cond.vl_mask.detach().cpu().numpy().astype(np.int64),
                "byt5_embed": cond.byt5.detach().float().cpu().numpy(),
                "byt5_mask": cond.byt5_mask.detach().cpu().numpy().astype(np.int64),
                "ocr_mask": np.array(bool(cond.byt5_mask.sum() > 0))}

    def from_cache_arrays(self, arrays) -> HunyuanConditioning | None:
        try:
            vl, vl_mask, b, b_mask = (np.asarray(arrays[k]) for k in ("vlm_embed", "vlm_mask", "byt5_embed",
                                                                        "byt5_mask"))
        except KeyError:
            return None
        if vl.ndim != 2 or vl.shape[1] != self.vl_width or b.shape != (BYT5_MAX_LENGTH, self.byt5_width) or \
                vl_mask.shape != vl.shape[:1] or b_mask.shape != (BYT5_MAX_LENGTH,):
            return None
        n = int(vl_mask.sum())
        device = self.bundle.denoiser.device
        return HunyuanConditioning(torch.from_numpy(vl[:n].copy()).to(device),
                                   torch.from_numpy(vl_mask[:n].astype(np.int64)).to(device),
                                   torch.from_numpy(b.copy()).to(device),
                                   torch.from_numpy(b_mask.astype(np.int64)).to(device))

    # ---- the training step
    def loss_weighted(self) -> bool:
        """The weighting scheme's loss weights apply to the sigma_scaled prediction only."""
        return self.model_prediction_type == "sigma_scaled"

    def predict(self, noised: NoisedLatents, conditioning: HunyuanConditioning, batch: dict) -> torch.Tensor:
        noisy = noised.noisy
        device, dtype = noisy.device, noisy.dtype
        cond = conditioning.to(device, dtype)
        sigmas = noised.timesteps.float() / fm.NUM_TRAIN_TIMESTEPS
        timestep = torch.floor(noised.timesteps.float()).to(dtype)  # sd-scripts: (sigma * 1000).to(int64)
        dit = self.bundle.denoiser
        if self.split_attn and noisy.shape[0] > 1:  # one sample at a time: less attention memory
            preds = [dit(hidden_states=noisy[i:i + 1], timestep=timestep[i:i + 1],
                         encoder_hidden_states=cond.vl[i:i + 1], encoder_attention_mask=cond.vl_mask[i:i + 1],
                         encoder_hidden_states_2=cond.byt5[i:i + 1],
                         encoder_attention_mask_2=cond.byt5_mask[i:i + 1], return_dict=False)[0]
                     for i in range(noisy.shape[0])]
            pred = torch.cat(preds)
        else:
            pred = dit(hidden_states=noisy, timestep=timestep, encoder_hidden_states=cond.vl,
                       encoder_attention_mask=cond.vl_mask, encoder_hidden_states_2=cond.byt5,
                       encoder_attention_mask_2=cond.byt5_mask, return_dict=False)[0]
        pred, _weights = fm.apply_model_prediction_type(self.model_prediction_type, pred, noisy, sigmas,
                                                        self.weighting_scheme)
        return pred

    # ---- adapters
    LORA_NETWORK_ARGS = {"split_qkv": flag, "verbose": flag, "network_reg_dims": str}

    @classmethod
    def lora_naming(cls, family: str, denoiser: torch.nn.Module | None = None,
                    network_args: dict | None = None) -> dict[str, Any]:
        """sd-scripts' networks/lora_hunyuan_image names: `lora_unet_` + the official module path with '_'
        (`double_blocks_N_img_attn_qkv`: q, k, v saved as one fused module, `single_blocks_N_linear1`: q, k, v and
        the MLP input), every Linear of the double and single blocks; no text-encoder LoRA. `split_qkv` gives each
        fused part its own down projection (block-diagonal in the file); `network_reg_dims` "regex=rank,..."."""
        from ...networks import network_args as na

        naming = super().lora_naming(family, denoiser)
        args = dict(network_args or {})
        config = dict(denoiser.config) if denoiser is not None else dict(layout.REAL_CONFIG)
        name_map = official_name_map(config)
        rule = na.rank_rule(pattern_ranks=na.pattern_dims(args["network_reg_dims"], "network_reg_dims")
                            if args.get("network_reg_dims") else ())
        naming.update(unet_name_map=name_map, unet_block_classes=DOUBLE_BLOCKS + SINGLE_BLOCKS, te_block_classes=(),
                      te_enabled=(False, False), shared_down=not flag(args.get("split_qkv", False)),
                      module_rank=rule, unet_file_name_map=name_map, verbose=flag(args.get("verbose", False)))
        return naming

    @classmethod
    def trainable_text_encoders(cls, args) -> tuple[bool, ...]:
        return False, False

    # ---- memory features
    @classmethod
    def block_swap_groups(cls, denoiser: torch.nn.Module, blocks_to_swap: int) -> list:
        """sd-scripts' split (library/hunyuan_image_models.py): N // 2 double blocks, the rest x 2 single blocks."""
        from ...training.block_swap import SwapGroup

        double = blocks_to_swap // 2
        single = (blocks_to_swap - double) * 2
        return [SwapGroup("transformer_blocks", denoiser.transformer_blocks, double),
                SwapGroup("single_transformer_blocks", denoiser.single_transformer_blocks, single)]

    # ---- metadata
    def adjust_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """sd-scripts' names: ss_base_model_version / modelspec.architecture 'hunyuan-image-2.1' (its LoRA files say
        implementation 'diffusers': the spec's), the flow-matching options it records, networks.lora_hunyuan_image."""
        out = dict(metadata)
        if "modelspec.architecture" in out:
            _, slash, adapter = out["modelspec.architecture"].partition("/")
            out["modelspec.architecture"] = ARCHITECTURE + (slash + adapter if slash else "")
        out.pop("modelspec.prediction_type", None)
        out["ss_base_model_version"] = BASE_MODEL_VERSION
        if out.get("ss_network_module") == "networks.lora":
            out["ss_network_module"] = "networks.lora_hunyuan_image"
        if "ss_network_module" in out:
            out.update(ss_timestep_sampling=str(self.timestep_sampling), ss_sigmoid_scale=str(self.sigmoid_scale),
                       ss_model_prediction_type=str(self.model_prediction_type),
                       ss_discrete_flow_shift=str(self.discrete_flow_shift), ss_logit_mean=str(self.logit_mean),
                       ss_logit_std=str(self.logit_std), ss_mode_scale=str(self.mode_scale))
        return out

    # ---- sampling
    def scheduler(self, sampler: str | None) -> Any:
        """The flow-matching Euler scheduler with shift 5.0 whatever sampler a prompt names (as sd-scripts)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLE_FLOW_SHIFT)

    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """HunyuanImagePipeline with this family's prompt encodings. Prompt options: --l the guidance scale
        (default 3.5; adaptive projected guidance, 1 turns it off), --s steps (default 20), --w/--h (multiples of
        32), --n, --d."""
        sampler_obj = HunyuanSampler(self, self.scheduler(sampler))

        def inputs(sample, device) -> dict:
            given = getattr(sample, "given", frozenset())
            return dict(prompt=sample.prompt, negative_prompt=sample.negative_prompt or "",
                        num_inference_steps=sample.steps if "steps" in given else SAMPLE_STEPS,
                        guidance_scale=sample.scale if "scale" in given else SAMPLE_SCALE)

        return SamplePipeline(sampler_obj, inputs)


def checkpoint_with_keywords(dit) -> None:
    """diffusers 0.42's HunyuanImageTransformer2DModel hands its blocks `attention_mask=` / `image_rotary_emb=` as
    keywords to the checkpointing function, which takes positional arguments only (a TypeError at the first training
    step with gradient checkpointing); pass them positionally, in the blocks' forward order."""
    func = dit._gradient_checkpointing_func
    if getattr(func, "takes_keywords", False):
        return

    def call(block, *args, **kwargs):
        names = ("attention_mask", "image_rotary_emb")
        if not kwargs or set(kwargs) - set(names) or len(args) != 3:
            return func(block, *args, **kwargs)
        return func(block, *args, *(kwargs.get(n) for n in names))

    call.takes_keywords = True
    dit._gradient_checkpointing_func = call


def official_name_map(config: dict):
    """diffusers module path -> the official module path (str), or (path, part, parts) for a layer the official
    layout fuses (the q/k/v of a double block's stream, a single block's q/k/v + MLP input)."""
    table: dict[str, Any] = {}
    for rule in layout.transformer_key_table(config):
        if not rule.official.endswith(".weight"):
            continue
        official = rule.official[:-len(".weight")]
        paths = [p[:-len(".weight")] for p in rule.diffusers]
        if len(paths) == 1:
            table[paths[0]] = official
        else:
            for i, path in enumerate(paths):
                table[path] = (official, i, len(paths))
    return lambda path: table.get(path, path)
