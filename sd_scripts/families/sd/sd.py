"""SD 1.x / SD 2.x: CLIP text conditioning (long captions in 75-token chunks, clip skip), the U-Net call and the
sample pipeline."""
from __future__ import annotations

from typing import Any

import torch

from ..base import NoisedLatents, SamplePipeline
from ..conditioning import MemoisedCaptions
from .common import UNetFamily

CHUNK = 75  # tokens between BOS and EOS in one CLIP window


class SDFamily(MemoisedCaptions, UNetFamily):
    """SD 1.x (CLIP-L, pads with EOS) and SD 2.x (OpenCLIP-H, pads with 0; 512 epsilon or 768 v-prediction)."""

    def __init__(self, bundle, args=None, *, clip_skip: int | None = None, max_token_length: int | None = None,
                 memo_size: int = 4096):
        super().__init__(bundle, args)
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

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        te = self.bundle.text_encoder
        outputs = []
        chunks = self._chunks(ids)
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(te.device)
            if self.clip_skip and self.clip_skip > 1:
                out = te(chunk, output_hidden_states=True)
                final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 4 and 5 layouts
                hidden = final_norm(out.hidden_states[-self.clip_skip])
            else:
                hidden = te(chunk)[0]
            if len(chunks) > 1:  # keep BOS of the first window and EOS of the last one only
                hidden = hidden[:, (0 if i == 0 else 1):(hidden.shape[1] if i == len(chunks) - 1 else -1)]
            outputs.append(hidden)
        return torch.cat(outputs, dim=1)

    def encode_batch(self, captions: list[str]) -> torch.Tensor:
        return self._encode_ids(self.tokenize(captions))

    # ---- U-Net
    def predict(self, noised: NoisedLatents, conditioning, batch) -> torch.Tensor:
        return self.bundle.unet(noised.noisy, noised.timesteps, conditioning, return_dict=False)[0]

    # ---- sampling
    def sample_pipeline(self, sampler: str | None, *, clip_skip: int | None = None) -> SamplePipeline:
        """StableDiffusionPipeline around the in-memory modules; prompts are encoded here with clip skip."""
        from diffusers import StableDiffusionPipeline

        b = self.bundle
        pipeline = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                           scheduler=self.scheduler(sampler), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)

        def inputs(sample, device) -> dict:
            return dict(prompt_embeds=encode_prompt(b.text_encoder, b.tokenizer, sample.prompt, device, clip_skip),
                        negative_prompt_embeds=encode_prompt(b.text_encoder, b.tokenizer, sample.negative_prompt or "",
                                                             device, clip_skip))

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
