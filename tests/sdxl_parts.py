"""Tiny SDXL components built directly with diffusers/transformers classes (for strategy and cache unit tests)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

TIME_DIM = 8  # addition_time_embed_dim
TE1, TE2 = 32, 48  # hidden sizes of the two text encoders (real: 768 and 1280)
PROJ = 40  # text encoder 2 projection (real: 1280)


def tiny_sdxl_parts(seed: int = 0) -> SimpleNamespace:
    """A bundle-like namespace: unet, vae, text_encoder(_2), tokenizer(_2), text_encoders, tokenizers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_scripts.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TE1 + TE2, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TIME_DIM * 6 + PROJ, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        scaling_factor=0.13025)
    common = dict(intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408,
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TE1, hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TE2, projection_dim=PROJ, hidden_act="gelu",
                                                     **common))
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    tok1, tok2 = load_clip_tokenizer("eos"), load_clip_tokenizer("zero")
    parts = SimpleNamespace(family="sdxl", unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2,
                            tokenizer=tok1, tokenizer_2=tok2, v_prediction=False)
    return parts


def bundle_view(parts: SimpleNamespace) -> SimpleNamespace:
    """A fresh bundle-like object over the same modules (so releasing encoders does not affect other tests)."""
    return _Bundle(**vars(parts))


class _Bundle(SimpleNamespace):
    @property
    def denoiser(self):
        return self.unet

    @property
    def text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    @text_encoders.setter
    def text_encoders(self, encoders):
        self.text_encoder, self.text_encoder_2 = encoders

    @property
    def tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]
