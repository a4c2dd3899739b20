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
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
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


def tiny_sdxl():
    """A U-Net with SDXL's block layout (2 ResNets per down block, attention from block 1) and two text encoders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
        norm_num_groups=8)
    common = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=100,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return unet, CLIPTextModel(CLIPTextConfig(**common)), CLIPTextModelWithProjection(
        CLIPTextConfig(projection_dim=16, **common))


@torch.no_grad()
def run_sdxl(unet, te1, te2):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (1, 6), generator=gen)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    out2 = te2(ids, output_hidden_states=True)
    hidden = torch.cat([te1(ids, output_hidden_states=True).hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    cond = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    return unet(x, torch.tensor([7]), hidden, added_cond_kwargs=cond).sample, hidden


def test_diffusers_loads_our_sdxl_file_with_sai_names(tmp_path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet, te1, te2 = tiny_sdxl()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=copy.deepcopy(te1), text_encoder_2=copy.deepcopy(te2),
                                     tokenizer=None, tokenizer_2=None, unet=copy.deepcopy(unet),
                                     scheduler=EulerDiscreteScheduler())
    base_out, base_hidden = run_sdxl(unet, te1, te2)
    net = create_network(unet=unet, text_encoders=[te1, te2], family="sdxl", network_dim=4, network_alpha=2,
                         network_args=["conv_dim=2"])
    names = {lora.lora_name for lora in net.all_loras()}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in names and "lora_unet_output_blocks_2_2_conv" in names
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.3)
    path = tmp_path / "sdxl.safetensors"
    net.save_weights(path)
    pipe.load_lora_weights(str(path))
    diffusers_out, diffusers_hidden = run_sdxl(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert not torch.allclose(diffusers_out, base_out, atol=1e-3)
    net.merge_into_base()
    ours_out, ours_hidden = run_sdxl(unet, te1, te2)
    assert torch.allclose(ours_hidden, diffusers_hidden, atol=1e-5)
    assert torch.allclose(ours_out, diffusers_out, atol=1e-4)
