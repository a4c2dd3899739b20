"""Module counts and names of networks.lora on the real SD1.5, SD2.1 and SDXL architectures (built without weights)."""
from __future__ import annotations

import pytest

from sd_scripts.networks.lora import create_network

SD1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD1_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768)
OPEN_CLIP_H_SD2 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                       hidden_act="gelu", projection_dim=512)
OPEN_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      hidden_act="gelu", projection_dim=1280)


def empty_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def empty_clip(config: dict, with_projection: bool = False):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with init_empty_weights():
        return cls(CLIPTextConfig(**config))


@pytest.fixture(scope="module")
def sd1():
    return empty_unet(SD1_UNET), empty_clip(CLIP_L)


def test_sd1_counts(sd1):
    unet, te = sd1
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (192, 72)
    locon = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1,
                           network_args=["conv_dim=4"], train_text_encoder=False)
    assert len(locon.unet_loras) == 278 and not locon.text_encoder_loras


def test_sd2_counts():
    net = create_network(unet=empty_unet(SD2_UNET), text_encoders=[empty_clip(OPEN_CLIP_H_SD2)], family="sd2",
                         network_dim=4, network_alpha=1)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (192, 138)
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2" in {m.lora_name for m in net.text_encoder_loras}


def test_sdxl_counts_and_sai_names():
    te1, te2 = empty_clip(CLIP_L), empty_clip(OPEN_CLIP_BIGG, with_projection=True)
    net = create_network(unet=empty_unet(SDXL_UNET), text_encoders=[te1, te2], family="sdxl", network_dim=4,
                         network_alpha=1, network_args=["conv_dim=4"])
    names = {m.lora_name for m in net.all_loras()}
    transformer_modules = [n for n in names if n.startswith("lora_unet") and ("transformer" in n or "proj_" in n)]
    assert len(transformer_modules) == 722
    assert len(net.text_encoder_loras) == 264
    assert sum(n.startswith("lora_te1_text_model_encoder_layers_") for n in names) == 72
    assert sum(n.startswith("lora_te2_text_model_encoder_layers_") for n in names) == 192
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
                     "lora_unet_input_blocks_4_1_proj_in",
                     "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                     "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                     "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_2_2_conv",
                     "lora_unet_output_blocks_5_2_conv", "lora_unet_output_blocks_8_0_in_layers_2"):
        assert expected in names, expected
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
