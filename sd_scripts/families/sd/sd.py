"""SD 1.x / SD 2.x: CLIP text conditioning (long captions in 75-token chunks, clip skip), the U-Net call and the
sample pipeline."""
from __future__ import annotations

from typing import Any

import torch

from ..base import NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from ..prompt_weighting import apply_weights, sample_max_length, tokenize_weighted
from .common import UNetFamily

CHUNK = 75  # tokens between BOS and EOS in one CLIP window


class SDFamily(MemoisedCaptions, UNetFamily):
    """SD 1.x (CLIP-L, pads with EOS) and SD 2.x (OpenCLIP-H, pads with 0; 512 epsilon or 768 v-prediction)."""

    def __init__(self, bundle, args=None, *, clip_skip: int | None = None, max_token_length: int | None = None,
                 memo_size: int = 4096):
        super().__init__(bundle, args)
        self.weighted_captions = bool(getattr(args, "weighted_captions", False))
        if args is not None:
            clip_skip, max_token_length = args.clip_skip, args.max_token_length
        self.clip_skip = clip_skip
        self.max_length = (max_token_length or CHUNK) + 2
        self.pad_id = bundle.tokenizer.pad_token_id
        self.eos_id = bundle.tokenizer.eos_token_id
        self.init_memo(memo_size)

    # ---- text
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = self.bundle.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").input_ids
        return ids

    def _chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, 2+75n] -> n windows of [B, 77], each BOS + 75 tokens + EOS/pad, as the U-Net was trained on."""
        if ids.shape[1] == CHUNK + 2:
            return [ids]
        bos, last = ids[:, :1], ids[:, -1:]
        chunks = []
        for start in range(1, ids.shape[1] - 1, CHUNK):
            body = ids[:, start:start + CHUNK].clone()
            end = last.clone()
            if self.pad_id != self.eos_id:
                # Pad-with-zero tokenizers: a window whose text ended before it ends with pad, not EOS.
                ended = (body[:, -1] == self.eos_id) | (body[:, -1] == self.pad_id)
                end[ended, 0] = self.pad_id
                end[~ended, 0] = self.eos_id
            else:
                end[:, 0] = self.eos_id
            chunks.append(torch.cat([bos, body, end], dim=1))
        return chunks

    def _encode_ids(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        te = self.bundle.text_encoder
        clip_skip = self.clip_skip if clip_skip is None else clip_skip
        outputs = []
        chunks = self._chunks(ids)
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(te.device)
            if clip_skip and clip_skip > 1:
                out = te(chunk, output_hidden_states=True)
                final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 4 and 5 layouts
                hidden = final_norm(out.hidden_states[-clip_skip])
            else:
                hidden = te(chunk)[0]
            if len(chunks) > 1:  # keep BOS of the first window and EOS of the last one only
                hidden = hidden[:, (0 if i == 0 else 1):(hidden.shape[1] if i == len(chunks) - 1 else -1)]
            outputs.append(hidden)
        return torch.cat(outputs, dim=1)

    def encode_batch(self, captions: list[str]) -> torch.Tensor:
        if self.weighted_captions:
            return self.encode_weighted(captions, self.max_length)
        return self._encode_ids(self.tokenize(captions))

    def encode_weighted(self, texts: list[str], max_length: int, clip_skip: int | None = None) -> torch.Tensor:
        """Texts with attention weights ((word:1.2), [word]) -> states [B, max_length, D], each token's state times
        its weight (families/prompt_weighting.py)."""
        ids, weights = tokenize_weighted(self.bundle.tokenizer, texts, max_length)
        return apply_weights(self._encode_ids(ids, clip_skip), weights)

    def sample_embeddings(self, prompt: str, negative_prompt: str, clip_skip: int | None = None):
        """A sample prompt and its negative prompt encoded like training captions (75-token windows, clip skip),
        always with their attention weights (as sd-scripts' sample pipelines), up to 225 tokens: ([1, L, D], [1, L, D])."""
        length = sample_max_length(self.bundle.tokenizer, [prompt, negative_prompt], self.max_length)
        states = self.encode_weighted([prompt, negative_prompt], length, clip_skip)
        return states[:1], states[1:]

    # ---- U-Net
    def predict(self, noised: NoisedLatents, conditioning, batch) -> torch.Tensor:
        return self.bundle.unet(noised.noisy, noised.timesteps, conditioning, return_dict=False)[0]

    # ---- sampling
    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """StableDiffusionPipeline around the in-memory modules; prompts are encoded here as in training (clip skip,
        75-token windows) with their attention weights."""
        from diffusers import StableDiffusionPipeline

        b = self.bundle
        pipeline = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                           scheduler=self.scheduler(sampler), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)

        def inputs(sample, device) -> dict:
            cond, uncond = self.sample_embeddings(sample.prompt, sample.negative_prompt or "", clip_skip)
            return dict(prompt_embeds=cond.to(device), negative_prompt_embeds=uncond.to(device))

        return SamplePipeline(pipeline, inputs)


def encode_prompt(text_encoder: Any, tokenizer: Any, prompt: str, device: Any, clip_skip: int | None = None) -> Any:
    """CLIP text embeddings [1, 77, dim] of one prompt, truncated to the tokenizer's length.

    `clip_skip` follows sd-scripts: 2 takes the penultimate layer's hidden states, then the final layer norm (as
    the original SD code does). Done here rather than by the pipeline so it works with every transformers layout.
    """
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_layer_norm = getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm")
    return final_layer_norm(hidden)
