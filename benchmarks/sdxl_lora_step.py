"""SDXL-architecture LoRA training step: steps/s and peak memory, with and without latent and text-encoder caching.

Random weights in the real SDXL base 1.0 architecture (2.57B U-Net, CLIP-L + OpenCLIP-bigG, VAE) built from the
bundled configs; our LoRA (U-Net only, rank 16) on them; batch 1 at 512 px; AdamW; fp32 on the CPU (bf16 autocast
and the GPU when one is present, --device cuda). Each mode runs in its own process so its peak memory is its own:

  cached    latents and text-encoder outputs computed once before the loop (what cache_latents +
            cache_text_encoder_outputs do): each step is U-Net forward + backward + AdamW
  uncached  each step also runs the VAE encoder on the image and both text encoders on the caption

    .venv/bin/python benchmarks/sdxl_lora_step.py --steps 3            # both modes, prints one JSON line each
    .venv/bin/python benchmarks/sdxl_lora_step.py --mode cached --steps 5 --device cuda --mixed-precision bf16

The step is the one the trainer runs (its strategy, noise and loss code), measured without data loading.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_mode(mode: str, steps: int, resolution: int, rank: int, device: str, mixed_precision: str) -> dict:
    import torch

    from sd_scripts.families.sd.arch import bundled_config
    from sd_scripts.models.bundle import ModelBundle
    from sd_scripts.families.sd.loading import build_text_encoder, build_text_encoder_2, build_unet, build_vae
    from sd_scripts.models.tokenizer import load_clip_tokenizer
    from sd_scripts.networks.lora import create_network
    from sd_scripts.families.sd.sdxl import SDXLFamily as SDXLStrategy
    from sd_scripts.training import noise as noise_math

    torch.manual_seed(0)
    t0 = time.time()
    unet = build_unet(bundled_config("sdxl", False, "unet"), meta=False)
    vae = build_vae(bundled_config("sdxl", False, "vae"), meta=False)
    te1 = build_text_encoder(bundled_config("sdxl", False, "text_encoder"), meta=False)
    te2 = build_text_encoder_2(bundled_config("sdxl", False, "text_encoder_2"), meta=False)
    for m in (unet, vae, te1, te2):
        m.requires_grad_(False).to(device)
    bundle = ModelBundle("sdxl", False, unet, vae, te1, load_clip_tokenizer("eos"), {}, "random",
                         text_encoder_2=te2, tokenizer_2=load_clip_tokenizer("zero"))
    build_s = time.time() - t0
    strategy = SDXLStrategy(bundle)
    net = create_network(unet=unet, text_encoders=[te1, te2], family="sdxl", network_dim=rank, network_alpha=1.0,
                         network_dropout=None, network_args=None, train_text_encoder=False)
    net.apply_to()
    net.to(device)
    groups, _ = net.prepare_optimizer_params(1e-4, None, 1e-4)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    alphas = torch.linspace(0.9999, 0.005, 1000, device=device)
    image = torch.rand(1, 3, resolution, resolution, device=device) * 2 - 1
    caption = ["a photo of sks dog, highly detailed, outdoors"]
    batch = {"original_sizes_hw": [(resolution, resolution)], "crop_top_lefts": [(0, 0)],
             "target_sizes_hw": [(resolution, resolution)]}
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    cached_latents = strategy.encode_images(image) if mode == "cached" else None
    if mode == "cached":
        strategy.encode_captions(caption, train_text_encoder=False)

    def step():
        latents = (cached_latents if cached_latents is not None else strategy.encode_images(image)) * 0.13025
        with torch.no_grad(), autocast:
            if mode == "cached":
                cond = strategy.encode_captions(caption, train_text_encoder=False)  # memoised before the loop
            else:
                cond = strategy.encode_ids(*strategy.tokenize(caption))  # both encoders, every step
        noise = torch.randn_like(latents)
        t = noise_math.sample_timesteps(1, 1000, device=latents.device)
        noisy = noise_math.add_noise(alphas, latents, noise, t)
        with autocast:
            pred = strategy.predict(noisy, t, cond, batch)
        loss = noise_math.diffusion_loss(pred.float(), noise, t, alphas)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for _ in range(steps + 1):  # the first step warms up and is left out
        start = time.time()
        step().item()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    steady = times[1:] or times
    result = {"mode": mode, "device": device, "mixed_precision": mixed_precision, "resolution": resolution,
              "rank": rank, "steps": steps, "build_s": round(build_s, 1), "first_step_s": round(times[0], 2),
              "s_per_step": round(sum(steady) / len(steady), 3), "steps_per_s": round(len(steady) / sum(steady), 4),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["cached", "uncached", "both"], default="both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.mode == "both":  # one process per mode: each peak is its own
        for mode in ("cached", "uncached"):
            subprocess.run([sys.executable, __file__, "--mode", mode] + [x for x in sys.argv[1:]
                           if x not in ("--mode", "both")], check=True)
        return
    import torch

    torch.set_num_threads(a.threads)
    print(json.dumps(run_mode(a.mode, a.steps, a.resolution, a.rank, a.device, a.mixed_precision)), flush=True)


if __name__ == "__main__":
    main()
