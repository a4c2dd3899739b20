"""Numerical check of the HunyuanImage-2.1 family against sd-scripts 48d368f's own modules, on the tiny model:
- the DiT: our diffusers HunyuanImageTransformer2DModel (official file -> diffusers names) and sd-scripts'
  HYImageDiffusionTransformer built at the tiny sizes from its own block classes, both loading the same official-layout
  file (sd-scripts strictly), on the same latents / timesteps / Qwen + byT5 states and masks (one caption with glyph
  text, one without and with padding);
- the VAE: our AutoencoderKLHunyuanImage and sd-scripts' Encoder / Decoder at the tiny widths, the same file;
- the prompt encodings: our encode_batch and sd-scripts' get_qwen_tokens / get_qwen_prompt_embeds_from_tokens and
  get_byt5_text_tokens / get_byt5_prompt_embeds_from_tokens (Qwen2_5_VLForConditionalGeneration at the tiny sizes
  holding the same language-model weights; both given the bundled Qwen tokenizer files), compared on the caption
  tokens (padding positions are masked in both).

    .venv/bin/python benchmarks/hunyuan_image_peer_check.py [--work /tmp/hunyuan-check]

Runs its `--peer` half in sd-scripts' venv (/tmp/peer/venv) and prints the largest absolute differences.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a photo of sks dog", 'a sign that says "HELLO" and “你好” on a wall, a longer caption']


def peer(work: str, sd_scripts: str) -> None:
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    sys.path.insert(0, sd_scripts)
    from flux_bench_launch import import_torchvision_guarded

    import_torchvision_guarded()
    import torch
    import torch.nn as nn
    from safetensors.torch import load_file
    from transformers import (ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                              T5Config, T5EncoderModel)

    from library import hunyuan_image_models as M
    from library import hunyuan_image_modules as hm
    from library import hunyuan_image_text_encoder as TE
    from library import hunyuan_image_vae as V

    model_dir = os.path.join(work, "model")
    inp = torch.load(os.path.join(work, "inputs.pt"))
    # DiT at the tiny sizes, sd-scripts' classes
    m = M.HYImageDiffusionTransformer.__new__(M.HYImageDiffusionTransformer)
    nn.Module.__init__(m)
    hidden, heads, depth = 64, 2, 2
    m.patch_size, m.in_channels, m.out_channels, m.unpatchify_channels = [1, 1], 64, 64, 64
    m.rope_dim_list, m.rope_theta, m.hidden_size, m.heads_num = [16, 16], 256, hidden, heads
    m.guidance_embed, m.use_attention_mask, m.attn_mode, m.split_attn = False, True, "torch", False
    m.byt5_in = hm.ByT5Mapper(in_dim=32, out_dim=2048, hidden_dim=2048, out_dim1=hidden, use_residual=False)
    m.img_in = hm.PatchEmbed2D(m.patch_size, 64, hidden)
    m.txt_in = hm.SingleTokenRefiner(64, hidden, heads, depth=2)
    m.time_in, m.time_r_in, m.guidance_in = hm.TimestepEmbedder(hidden, nn.SiLU), None, None
    kw = dict(mlp_width_ratio=4, mlp_act_type="gelu_tanh", qk_norm=True, qk_norm_type="rms")
    m.double_blocks = nn.ModuleList([hm.MMDoubleStreamBlock(hidden, heads, qkv_bias=True, **kw) for _ in range(depth)])
    m.single_blocks = nn.ModuleList([hm.MMSingleStreamBlock(hidden, heads, **kw) for _ in range(depth)])
    m.final_layer = hm.FinalLayer(hidden, m.patch_size, 64, nn.SiLU)
    m.gradient_checkpointing = m.cpu_offload_checkpointing = False
    m.blocks_to_swap = m.offloader_double = m.offloader_single = None
    m.load_state_dict(load_file(os.path.join(model_dir, "hunyuanimage2.1-tiny.safetensors")), strict=True)
    out = {}
    with torch.no_grad():
        out["dit"] = m(inp["x"], inp["t"], inp["txt"], inp["mask"], inp["byt5"], inp["byt5_mask"])
    # VAE
    vae = V.HunyuanVAE2D.__new__(V.HunyuanVAE2D)
    nn.Module.__init__(vae)
    ch = (32, 32, 64, 64, 128, 128)
    vae.ffactor_spatial, vae.scaling_factor, vae.use_spatial_tiling = 32, V.LATENT_SCALING_FACTOR, False
    vae.encoder = V.Encoder(in_channels=3, z_channels=64, block_out_channels=ch, num_res_blocks=1, ffactor_spatial=32,
                            chunk_size=None)
    vae.decoder = V.Decoder(z_channels=64, out_channels=3, block_out_channels=list(reversed(ch)), num_res_blocks=1,
                            ffactor_spatial=32, chunk_size=None)
    vae.load_state_dict(load_file(os.path.join(model_dir, "vae.safetensors")), strict=True)
    with torch.no_grad():
        out["vae_mean"] = vae.encode(inp["img"]).mean
        out["vae_decoded"] = vae.decode(inp["z"])
    # prompts
    tok = Qwen2Tokenizer.from_pretrained(os.path.join(REPO, "sd_scripts", "models", "configs", "qwen_tokenizer"))
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=152064, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"type": "default", "mrope_section": [4, 6, 6]}, max_position_embeddings=128000)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                                num_heads=2, out_hidden_size=64,
                                                                fullatt_block_indexes=[0]),
                           vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                           image_token_id=151655, video_token_id=151656, **text)
    vlm = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    qwen_file = os.path.join(model_dir, "qwen_2.5_vl.safetensors")
    sd = {k[len("model."):]: v.float() for k, v in load_file(qwen_file).items()}
    vlm.model.language_model.load_state_dict(sd, strict=True)
    ids, mask = TE.get_qwen_tokens(tok, CAPTIONS)
    out["vl"], out["vl_mask"] = TE.get_qwen_prompt_embeds_from_tokens(vlm.float(), ids, mask)
    btok = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, vocab_size=384,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                   use_cache=False)).encoder.eval()
    TE.add_special_token(btok, byt5)
    bsd = load_file(os.path.join(model_dir, "byt5.safetensors"))
    bsd = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in bsd.items()}
    bsd["embed_tokens.weight"] = bsd.pop("shared.weight")
    byt5.load_state_dict(bsd, strict=True)
    t, mk = TE.get_byt5_text_tokens(btok, CAPTIONS[1])
    _, out["byt5_1"], out["byt5_mask_1"] = TE.get_byt5_prompt_embeds_from_tokens(byt5, t, mk)
    out["byt5_none_0"] = torch.tensor(TE.get_byt5_text_tokens(btok, CAPTIONS[0])[0] is None)
    torch.save(out, os.path.join(work, "peer.pt"))


def ours(work: str, peer_python: str, sd_scripts: str) -> int:
    sys.path.insert(0, REPO)
    import torch

    from sd_scripts.families import family_class
    from sd_scripts.families.hunyuan_image.tiny import build_tiny_hunyuan
    from sd_scripts.models.loading import load_model

    paths = build_tiny_hunyuan(os.path.join(work, "model"), layout="single")
    g = torch.Generator().manual_seed(0)
    inp = dict(x=torch.randn(2, 64, 3, 4, generator=g), t=torch.tensor([250.0, 900.0]),
               txt=torch.randn(2, 7, 64, generator=g), mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
               byt5=torch.randn(2, 128, 32, generator=g), byt5_mask=torch.zeros(2, 128, dtype=torch.long),
               img=torch.rand(1, 3, 64, 96, generator=g) * 2 - 1, z=torch.randn(1, 64, 2, 3, generator=g))
    inp["byt5_mask"][0, :5] = 1
    inp["byt5"][1] = 0
    torch.save(inp, os.path.join(work, "inputs.pt"))
    bundle = load_model(paths["pretrained_model_name_or_path"], text_encoder=paths["text_encoder"],
                        byt5=paths["byt5"], vae=paths["vae"])
    family = family_class(bundle.family)(bundle, None)
    res = {}
    with torch.no_grad():
        res["dit"] = bundle.denoiser(hidden_states=inp["x"], timestep=inp["t"], encoder_hidden_states=inp["txt"],
                                     encoder_attention_mask=inp["mask"], encoder_hidden_states_2=inp["byt5"],
                                     encoder_attention_mask_2=inp["byt5_mask"], return_dict=False)[0]
        res["vae_mean"] = bundle.vae.encode(inp["img"]).latent_dist.mean
        res["vae_decoded"] = bundle.vae.decode(inp["z"]).sample
        cond = family.encode_batch(CAPTIONS)
    proc = subprocess.run([peer_python, os.path.abspath(__file__), "--peer", "--work", work, "--sd-scripts",
                           sd_scripts], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        return 1
    theirs = torch.load(os.path.join(work, "peer.pt"))
    valid = theirs["vl_mask"].bool()
    rows = [("DiT output", res["dit"], theirs["dit"]), ("VAE encode mean", res["vae_mean"], theirs["vae_mean"]),
            ("VAE decode", res["vae_decoded"], theirs["vae_decoded"].reshape(res["vae_decoded"].shape)),
            ("Qwen states (caption tokens)", cond.vl[valid], theirs["vl"][valid]),
            ("byT5 states (glyph caption)", cond.byt5[1], theirs["byt5_1"][0])]
    worst = 0.0
    for name, a, b in rows:
        diff = float((a.float() - b.float()).abs().max())
        worst = max(worst, diff / max(1.0, float(b.abs().max())))
        print(f"{name:32s} max |ours - sd-scripts| {diff:.3g}   (max |value| {float(b.abs().max()):.3g})")
    masks_equal = torch.equal(cond.vl_mask.cpu(), theirs["vl_mask"]) and \
        torch.equal(cond.byt5_mask[1].cpu(), theirs["byt5_mask_1"][0]) and int(cond.byt5_mask[0].sum()) == 0 and \
        bool(theirs["byt5_none_0"])
    print(f"masks equal (Qwen; byT5 with / without glyph text): {masks_equal}")
    return 0 if masks_equal and worst < 1e-4 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/hunyuan-check")
    p.add_argument("--sd-scripts", default="/tmp/peer/sd-scripts")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.peer:
        peer(a.work, a.sd_scripts)
        return 0
    return ours(a.work, a.peer_python, a.sd_scripts)


if __name__ == "__main__":
    sys.exit(main())
