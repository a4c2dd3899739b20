"""SDXL: two CLIP text encoders, pooled text embedding and size/crop conditioning for the U-Net.

Conditioning (as SDXL base was trained, and as kohya sd-scripts and diffusers compute it):
- hidden states: the penultimate layer of text encoder 1 (CLIP-L, 768) and of text encoder 2 (OpenCLIP-bigG, 1280),
  concatenated per token -> [B, 77, 2048]. Captions longer than 75 tokens (max_token_length 150/225) are encoded in
  75-token windows, each BOS + 75 tokens + EOS/pad, and joined like SD 1.x/2.x: BOS of the first window, the text of
  every window, the last token of the last window -> [B, 2 + 75k, 2048].
- pooled: text encoder 2's projected output at the first EOS of the first window -> [B, 1280]. Taken at the EOS
  position itself (not CLIP's highest-token-id shortcut), so added textual-inversion tokens cannot move it.
- time ids per sample: original size (h, w), crop top-left (top, left), target size (h, w) -> [B, 6], from the
  batch's `original_sizes_hw`, `crop_top_lefts` and `target_sizes_hw` (target = the bucket).
Frozen encoders: every caption is encoded once and memoised (or all of them before training, see te_cache.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..base import NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from ..prompt_weighting import apply_weights, sample_max_length, tokenize_weighted
from .common import UNetFamily

log = logging.getLogger(__name__)

CHUNK = 75  # tokens between BOS and EOS in one CLIP window
WINDOW = CHUNK + 2
TE_CACHE_SUFFIX = "_te_outputs.npz"


@dataclass
class SDXLConditioning:
    """What the SDXL U-Net is conditioned on: token states [B, L, 2048] and the pooled embedding [B, 1280]."""

    hidden: torch.Tensor
    pooled: torch.Tensor

    def to(self, *args, **kwargs) -> "SDXLConditioning":
        return SDXLConditioning(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int) -> "SDXLConditioning":
        """One caption's conditioning (no batch dimension)."""
        return SDXLConditioning(self.hidden[index], self.pooled[index])

    @staticmethod
    def stack(items: Sequence["SDXLConditioning"]) -> "SDXLConditioning":
        return SDXLConditioning(torch.stack([i.hidden for i in items]), torch.stack([i.pooled for i in items]))


# ------------------------------------------------------------------ 75-token windows
def clip_windows(ids: torch.Tensor, *, pad_id: int, eos_id: int) -> list[torch.Tensor]:
    """Token ids [B, 2+75k] -> k windows [B, 77], each BOS + 75 tokens + an end token.

    The end token is EOS for pad-with-EOS tokenizers; for pad-with-zero tokenizers (SDXL tokenizer 2) it is pad
    when the text ended inside the window and EOS when it goes on, as each window would be tokenized alone.
    """
    if ids.shape[1] == WINDOW:
        return [ids]
    if (ids.shape[1] - 2) % CHUNK:
        raise ValueError(f"token ids of length {ids.shape[1]}: expected 2 + a multiple of {CHUNK}")
    bos = ids[:, :1]
    windows = []
    for start in range(1, ids.shape[1] - 1, CHUNK):
        body = ids[:, start:start + CHUNK]
        end = torch.full_like(bos, eos_id)
        if pad_id != eos_id:
            ended = (body[:, -1] == eos_id) | (body[:, -1] == pad_id)
            end[ended, 0] = pad_id
        windows.append(torch.cat([bos, body, end], dim=1))
    return windows


def join_windows(states: list[torch.Tensor]) -> torch.Tensor:
    """Per-window states [B, 77, D] -> [B, 2+75k, D]: the first BOS, every window's text, the last end token."""
    if len(states) == 1:
        return states[0]
    parts = [states[0][:, :1]] + [s[:, 1:-1] for s in states] + [states[-1][:, -1:]]
    return torch.cat(parts, dim=1)


def first_eos_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first EOS in each row of ids [B, T] (0 when a row has none)."""
    return (ids == eos_id).int().argmax(dim=1)


# ------------------------------------------------------------------ family
class SDXLFamily(MemoisedCaptions, UNetFamily):
    """Conditioning, latents, the U-Net call and the sample pipeline of SDXL (see the module docstring)."""

    te_cache_suffix = TE_CACHE_SUFFIX

    @classmethod
    def lora_naming(cls, family: str, denoiser=None) -> dict:
        """kohya names SDXL U-Net layers by their original (SAI) module paths, following `denoiser`'s block layout
        when given (SDXL base otherwise)."""
        from .sdxl_names import diffusers_to_sai_module_path, sai_name_map

        naming = super().lora_naming(family, denoiser)
        naming["unet_name_map"] = sai_name_map(denoiser) if denoiser is not None else diffusers_to_sai_module_path
        return naming

    def __init__(self, bundle, args=None, *, max_token_length: int | None = None, memo_size: int = 4096):
        super().__init__(bundle, args)
        if bundle.text_encoder_2 is None or bundle.tokenizer_2 is None:
            raise ValueError("an SDXL bundle needs text_encoder_2 and tokenizer_2")
        if args is not None:
            max_token_length = args.max_token_length
            if getattr(args, "clip_skip", None):
                log.warning("clip_skip is ignored for SDXL: it always uses the penultimate layer of both text "
                            "encoders")
        self.weighted_captions = bool(getattr(args, "weighted_captions", False))
        self.max_length = (max_token_length or CHUNK) + 2
        self._te1_width = int(bundle.text_encoder.config.hidden_size)
        self._te2_width = int(bundle.text_encoder_2.config.hidden_size)
        self.init_memo(memo_size)

    # ---- text
    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of both tokenizers, [B, max_token_length + 2] each."""
        return tuple(tok(captions, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids for tok in self.bundle.tokenizers)

    def encode_batch(self, captions: list[str]) -> SDXLConditioning:
        if self.weighted_captions:
            return self.encode_weighted(captions, self.max_length)
        return self.encode_ids(*self.tokenize(captions))

    def encode_weighted(self, texts: list[str], max_length: int) -> SDXLConditioning:
        """Texts with attention weights ((word:1.2), [word]): each encoder's token states times the token weights
        (families/prompt_weighting.py); the pooled embedding is not weighted (as sd-scripts)."""
        (ids1, w1), (ids2, w2) = (tokenize_weighted(tok, texts, max_length) for tok in self.bundle.tokenizers)
        cond = self.encode_ids(ids1, ids2)
        width = self._te1_width
        hidden = torch.cat([apply_weights(cond.hidden[..., :width], w1), apply_weights(cond.hidden[..., width:], w2)],
                           dim=-1)
        return SDXLConditioning(hidden, cond.pooled)

    def sample_embeddings(self, prompt: str, negative_prompt: str) -> tuple[SDXLConditioning, SDXLConditioning]:
        """A sample prompt and its negative prompt encoded like training captions, always with their attention
        weights (as sd-scripts' sample pipelines), up to 225 tokens."""
        length = sample_max_length(self.bundle.tokenizer, [prompt, negative_prompt], self.max_length)
        cond = self.encode_weighted([prompt, negative_prompt], length)
        return (SDXLConditioning(cond.hidden[:1], cond.pooled[:1]),
                SDXLConditioning(cond.hidden[1:], cond.pooled[1:]))

    def encode_ids(self, ids1: torch.Tensor, ids2: torch.Tensor) -> SDXLConditioning:
        """Token ids of both tokenizers -> conditioning, every window of every caption in one encoder call."""
        b = self.bundle
        te1, te2 = b.text_encoder, b.text_encoder_2
        tok1, tok2 = b.tokenizer, b.tokenizer_2
        windows1 = clip_windows(ids1, pad_id=tok1.pad_token_id, eos_id=tok1.eos_token_id)
        windows2 = clip_windows(ids2, pad_id=tok2.pad_token_id, eos_id=tok2.eos_token_id)
        batch = ids1.shape[0]
        states1 = te1(torch.cat(windows1).to(te1.device), output_hidden_states=True).hidden_states[-2]
        ids2_all = torch.cat(windows2).to(te2.device)
        out2 = te2(ids2_all, output_hidden_states=True)
        states2 = out2.hidden_states[-2]
        hidden1 = join_windows(list(states1.split(batch)))
        hidden2 = join_windows(list(states2.split(batch)))
        # pooled: the first window's final-layer state at its first EOS, through text_projection
        first_last = out2.last_hidden_state[:batch]
        eos = first_eos_positions(ids2_all[:batch], tok2.eos_token_id)
        pooled_in = first_last[torch.arange(batch, device=first_last.device), eos]
        pooled = te2.text_projection(pooled_in.to(te2.text_projection.weight.dtype))
        hidden = torch.cat([hidden1, hidden2.to(hidden1.device, hidden1.dtype)], dim=-1)
        return SDXLConditioning(hidden, pooled.to(hidden.device))

    # ---- text-encoder output cache files (training/te_cache.py); kohya's keys, so sd-scripts reads them too
    def cache_arrays(self, cond: SDXLConditioning) -> dict[str, np.ndarray]:
        """One caption's conditioning -> float32 arrays: hidden_state1 [L, 768], hidden_state2 [L, 1280],
        pool2 [1280]."""
        hidden = cond.hidden.detach().float().cpu().numpy()
        return {"hidden_state1": hidden[:, :self._te1_width], "hidden_state2": hidden[:, self._te1_width:],
                "pool2": cond.pooled.detach().float().cpu().numpy()}

    def from_cache_arrays(self, arrays) -> SDXLConditioning | None:
        """The inverse of cache_arrays; None when the arrays do not fit this model and max_token_length."""
        try:
            h1, h2, pool = (np.asarray(arrays[k]) for k in ("hidden_state1", "hidden_state2", "pool2"))
        except KeyError:
            return None
        if h1.shape != (self.max_length, self._te1_width) or h2.shape != (self.max_length, self._te2_width) \
                or pool.ndim != 1:
            return None
        te = self.bundle.text_encoder
        device, dtype = (te.device, te.dtype) if te is not None else (self.bundle.unet.device, torch.float32)
        hidden = torch.from_numpy(np.concatenate([h1, h2], axis=-1)).to(device, dtype)
        return SDXLConditioning(hidden, torch.from_numpy(pool.copy()).to(device, dtype))

    # ---- U-Net
    @staticmethod
    def time_ids(batch: dict, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """[B, 6] per sample: original (h, w), crop (top, left), target (h, w) from the batch."""
        rows = [list(o) + list(c) + list(t) for o, c, t in zip(batch["original_sizes_hw"], batch["crop_top_lefts"],
                                                              batch["target_sizes_hw"])]
        return torch.tensor(rows, dtype=dtype, device=device)

    def predict(self, noised: NoisedLatents, conditioning: SDXLConditioning, batch) -> torch.Tensor:
        noisy_latents = noised.noisy
        device, dtype = noisy_latents.device, conditioning.hidden.dtype
        added = {"text_embeds": conditioning.pooled.to(device), "time_ids": self.time_ids(batch, device=device,
                                                                                          dtype=dtype)}
        return self.bundle.unet(noisy_latents, noised.timesteps, conditioning.hidden.to(device),
                                added_cond_kwargs=added, return_dict=False)[0]

    # ---- sampling
    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """StableDiffusionXLPipeline around the in-memory modules; prompts are encoded here as in training (penultimate
        layers of both encoders in 75-token windows, pooled text encoder 2 output) with their attention weights;
        size conditioning = the image size, no crop."""
        from diffusers import StableDiffusionXLPipeline

        b = self.bundle
        pipeline = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2,
                                             tokenizer=b.tokenizer, tokenizer_2=b.tokenizer_2, unet=b.unet,
                                             scheduler=self.scheduler(sampler), add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)

        def inputs(sample, device) -> dict:
            cond, uncond = self.sample_embeddings(sample.prompt, sample.negative_prompt or "")
            return dict(prompt_embeds=cond.hidden.to(device), pooled_prompt_embeds=cond.pooled.to(device),
                        negative_prompt_embeds=uncond.hidden.to(device),
                        negative_pooled_prompt_embeds=uncond.pooled.to(device))

        return SamplePipeline(pipeline, inputs)
