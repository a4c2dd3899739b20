"""Our LoRA files load in diffusers (load_lora_weights, which needs peft) and give what our own merge gives."""
from __future__ import annotations

import copy

import pytest
import torch

from sd_scripts.networks.lora import create_network

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def tiny_pipeline(unet, text_encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def run(unet, text_encoder, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (1, 6), generator=gen)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = text_encoder(ids).last_hidden_state
    return unet(x, torch.tensor([7]), hidden).sample, hidden


@pytest.mark.parametrize("network_args", [None, ["conv_dim=2", "conv_alpha=1"]], ids=["lora", "locon"])
def test_diffusers_loads_our_file_and_matches_our_merge(tmp_path, network_args):
    unet, te = tiny_unet(), tiny_text_encoder()
    pipe = tiny_pipeline(copy.deepcopy(unet), copy.deepcopy(te))
    base_out, base_hidden = run(unet, te)

    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=2,
                         network_args=network_args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.3)
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, metadata={"ss_network_module": "networks.lora"})

    pipe.load_lora_weights(str(path))
    diffusers_out, diffusers_hidden = run(pipe.unet, pipe.text_encoder)
    assert not torch.allclose(diffusers_out, base_out, atol=1e-3), "diffusers did not apply the U-Net LoRA"
    assert not torch.allclose(diffusers_hidden, base_hidden, atol=1e-3), "diffusers did not apply the TE LoRA"

    net.apply_to()
    ours_runtime, _ = run(unet, te)
    net.merge_into_base()
    ours_merged, ours_hidden = run(unet, te)
    assert torch.allclose(ours_hidden, diffusers_hidden, atol=1e-5)
    assert torch.allclose(ours_merged, diffusers_out, atol=1e-4)
    assert torch.allclose(ours_runtime, diffusers_out, atol=1e-4)
