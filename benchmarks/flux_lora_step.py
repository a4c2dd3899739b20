"""FLUX.1 LoRA training step: our `python -m sd_scripts.flux_train_network` beside sd-scripts' `flux_train_network.py`
(kohya-ss/sd-scripts 48d368f) on the same reduced FLUX.1-dev model, in the same run, interleaved (ours, peer, ours,
peer, ...), with and without --blocks_to_swap and --fp8_base. Prints s/step (steady), time to first step, peak memory
and the ratios ours/peer.

The workload (random weights, seeded, offline; built once under --work and reused):
  denoiser  FLUX.1-dev architecture at the REAL block width: hidden 3072 = 24 heads x 128, RoPE axes 16/56/56,
            in 64 (packed 16-channel latents), context 4096 (T5-XXL width), vec 768 (CLIP-L pooled), guidance
            embedding, MLP ratio 4, qkv bias, but FEWER blocks (default 1 double + 2 single; --blocks D S).
            Written as one BFL-layout single file (`flux1-bench.safetensors`, the layout of flux1-dev.safetensors).
  clip_l    a CLIP-L text model with the real output width 768 but 1 layer (12 heads of 64, MLP 768)
  t5xxl     a T5 v1.1 encoder with the real output width 4096 but 1 layer (2 heads of 64, gated FF 256) and the real
            32,128-token vocabulary. Both encoders are tiny inside ON PURPOSE: both trainers run with
            --cache_text_encoder_outputs, so the encoders run once per caption before the loop and are not what a
            step measures; they only shift the time to the first step a little (and both trainers load the same
            files). sd-scripts builds its encoders from fixed real-size configs, so flux_bench_launch.py sets the
            sizes from the files (see that file).
  ae        the real FLUX.1 autoencoder architecture (16 latent channels), random weights; latents are cached
            (--cache_latents) before the loop.
  images    --images (default 4) synthetic captioned images at --resolution (default 256 px) in a '10_sks dog' folder.

Training options, identical for both trainers: LoRA (networks.lora_flux) rank 16 / alpha 16 on the double and single
blocks (--network_train_unet_only), AdamW lr 1e-4 constant, batch 1, --cache_latents, --cache_text_encoder_outputs,
--t5xxl_max_token_length (default 128 on the CPU), timestep_sampling shift 3.1582, model_prediction_type raw,
guidance 1.0, --sdpa, seed 42, 0 DataLoader workers, fp32 on the CPU (--mixed_precision no: both trainers support it
there; the fp8 variant needs bf16 autocast, which sd-scripts requires for --fp8_base). Each run is
`accelerate launch [--cpu] --num_cpu_threads_per_process T benchmarks/flux_bench_launch.py ours|peer ...`.

Variants (--variants, default base,swap,fp8):
  base   the options above
  swap   + --blocks_to_swap N (--swap, default 1; --full: 18). sd-scripts only allows N//2 <= double-2 and 2*(N-N//2) <= single-2,
         so it needs e.g. --blocks 1 4 for N=1 (the default 1 double + 2 single cannot swap in sd-scripts: its run is
         then reported as refused). On the CPU both sides of a swap are host memory: the figure says whether the
         option works and what it costs, not what it saves (that needs a GPU).
  fp8    + --fp8_base with --mixed_precision bf16
Our trainer may refuse --blocks_to_swap / --fp8_base (accepted by name, not implemented yet at the time of writing):
a run that exits non-zero before its first step with the option named in its output is reported as `refused` and
the variant's remaining runs are skipped (the peer is then run once alone unless --no-peer-alone, so its figure is
there when ours arrives). Re-run `--variants swap,fp8` once the options are implemented.

Timing: ours from its --events_file (each progress event carries the trainer's wall clock), the peer from its tqdm
bar ('steps'), each line stamped by the harness when it arrives; steady s/step = (t_N - t_W) / (N - W) with
W = --warmup (default 1) and N = --steps; time to first step = launch -> step 1. Peak memory: ru_maxrss of the
trainer process (the launch shim writes it at exit; the accelerate launcher process is not counted) and on a GPU
torch.cuda.max_memory_allocated / max_memory_reserved of the trainer process.

    # peer tree + venv (once): the fetch tool gives the sd-scripts git dir
    bash /work/shared/bench/setup_peer.sh /work/.mirror/kohya-ss+sd-scripts/repo 48d368fa557731ad0488c07304dfeba8c07910eb
    # CPU: 3 pairs of the base variant, then one try of each memory variant (refused ones are reported and skipped)
    .venv/bin/python benchmarks/flux_lora_step.py --pairs 3 --steps 4 --variants base
    .venv/bin/python benchmarks/flux_lora_step.py --pairs 1 --steps 3 --variants swap,fp8 --blocks 1 4
    # only the workload (prints its paths), or only our trainer
    .venv/bin/python benchmarks/flux_lora_step.py --build-only
    .venv/bin/python benchmarks/flux_lora_step.py --no-peer --pairs 1
    # GPU (not run yet: no GPU was lent when this was written): the full FLUX.1-dev depth (19 + 38 blocks) at 1024 px,
    # bf16, gradient checkpointing, T5 512 tokens; with and without block swap
    .venv/bin/python benchmarks/flux_lora_step.py --full --device cuda --pairs 2 --steps 6 --variants base,swap,fp8

Writes under --work (default /tmp/flux-bench): the workload, one folder per run (log.txt, command.txt, events.jsonl,
mem.json, result.json) and summary.json; stdout: one JSON line per run, then a table and for each variant the line
`<variant>: ratio s/step 1.02x, first step 0.98x, peak RSS 1.00x (n=3 pairs, ...)` (ours/peer: below 1x = ours
better). The machine is shared: the figures carry that noise, take medians of several pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LAUNCH = os.path.join(REPO, "benchmarks", "flux_bench_launch.py")
PEER_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
WORKLOAD_VERSION = 1

# the narrow text encoders: real OUTPUT widths (what the denoiser reads: CLIP-L pooled 768, T5-XXL 4096), 1 layer
BENCH_T5 = dict(d_kv=64, num_heads=2, d_ff=256, num_layers=1, relative_attention_num_buckets=32)
FULL_BLOCKS = (19, 38)
REAL = dict(heads=24, context_dim=4096, vec_dim=768, ae="real")  # FLUX.1-dev's widths
# what tests/test_benchmarks_flux.py builds: 1 head of 128 (RoPE 16/56/56 kept), narrow context / vec, tiny AE
TEST_SIZES = dict(heads=1, context_dim=64, vec_dim=32, ae="tiny")


# ---------------------------------------------------------------- the workload


def transformer_config(double: int, single: int, heads: int = 24, context_dim: int = 4096, vec_dim: int = 768) -> dict:
    """FLUX.1-dev's diffusers transformer config with `double` / `single` blocks; the other arguments default to
    the real model (24 heads of 128 = width 3072, T5 context 4096, CLIP vec 768) and are only changed by the test."""
    from sd_scripts.families.flux import layout

    if double < 1 or single < 1:
        raise ValueError("the model needs at least 1 double and 1 single block")
    return dict(layout.FLUX_DEV_CONFIG, num_layers=double, num_single_layers=single, num_attention_heads=heads,
                joint_attention_dim=context_dim, pooled_projection_dim=vec_dim, _class_name="FluxTransformer2DModel")


def _random(seed: int, name: str, shape, dtype):
    """Seeded per tensor name: matrices N(0, 1/fan_in), 1-D norm scales/weights near 1, other vectors near 0."""
    from sd_scripts.tools.tiny_model import random_tensor

    norm = len(shape) == 1 and (name.endswith(".scale") or "norm" in name) and not name.endswith(".bias")
    return random_tensor(seed, name, tuple(shape), norm).to(dtype)


def bfl_transformer_state(config: dict, seed: int, dtype) -> dict:
    """Random BFL-layout tensors (bare names, as in flux1-dev.safetensors) of the denoiser `config` describes,
    made tensor by tensor (no module is built, so the full 12B model needs only its own bytes)."""
    from sd_scripts.families.flux import layout
    from sd_scripts.families.flux.weights import build_transformer

    shapes = {k: tuple(v.shape) for k, v in build_transformer(config, meta=True).state_dict().items()}
    out = {}
    for rule in layout.transformer_key_table(config):
        parts = [shapes[k] for k in rule.diffusers]
        shape = (sum(p[0] for p in parts),) + parts[0][1:] if rule.kind == layout.SPLIT else parts[0]
        out[rule.bfl] = _random(seed, "transformer:" + rule.bfl, shape, dtype)
    return out


def _randomised(module, seed: int, component: str, skip=()):
    return {n: _random(seed, f"{component}:{n}", p.shape, p.dtype)
            for n, p in module.state_dict().items() if n not in skip}


def build_text_encoders(seed: int, vec_dim: int = 768, context_dim: int = 4096):
    """(CLIPTextModel, T5EncoderModel): 1 layer, narrow inside, output widths vec_dim / context_dim (real: 768 /
    4096), seeded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sd_scripts.families.sd.arch import bundled_config
    from sd_scripts.models.t5 import T5_XXL_CONFIG

    clip_sizes = dict(hidden_size=vec_dim, intermediate_size=vec_dim, num_hidden_layers=1,
                      num_attention_heads=max(1, vec_dim // 64), projection_dim=vec_dim)
    clip_cfg = {k: v for k, v in dict(bundled_config("sd1", False, "text_encoder"), **clip_sizes).items()
                if not k.startswith("_")}
    with init_empty_weights():
        clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    clip.load_state_dict(_randomised(clip, seed, "clip_l"), strict=True, assign=True)
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**dict(T5_XXL_CONFIG, **BENCH_T5, d_model=context_dim)))
    state = _randomised(t5, seed, "t5", skip=("encoder.embed_tokens.weight",))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    t5.load_state_dict(state, strict=True, assign=True)
    t5.tie_weights()
    for m in (clip, t5):
        m.eval().to(torch.float32)
    return clip, t5


def build_ae(seed: int, size: str = "real"):
    """The real FLUX.1 autoencoder architecture (diffusers AutoencoderKL; 'tiny': the repo's tiny FLUX AE widths,
    for the test), seeded random weights."""
    from sd_scripts.families.flux import layout
    from sd_scripts.families.flux.tiny import TINY_AE
    from sd_scripts.families.sd.loading import build_vae

    ae = build_vae(dict(layout.AE_CONFIG, **(TINY_AE if size == "tiny" else {})))
    ae.load_state_dict(_randomised(ae, seed, "ae"), strict=True, assign=True)
    return ae.eval()


def make_images(data_dir: str, count: int, resolution: int) -> str:
    from PIL import Image, ImageDraw

    folder = os.path.join(data_dir, "10_sks dog")
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (resolution, resolution), ((i * 37) % 255, (i * 91) % 255, (i * 53) % 255))
        d = ImageDraw.Draw(img)
        d.ellipse((resolution // 4, resolution // 4, 3 * resolution // 4, 3 * resolution // 4),
                  fill=(255 - i * 10, 120, i * 12))
        d.rectangle((i * 7 % resolution, 0, i * 7 % resolution + resolution // 8, resolution // 3), fill=(20, 200, 90))
        img.save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(f"a photo of sks dog, picture {i}, green bar, outdoors")
    return data_dir


def write_tokenizers(folder: str) -> str:
    """sd-scripts' --tokenizer_cache_dir layout (`openai_clip-vit-large-patch14`, `google_t5-v1_1-xxl`) from the
    tokenizers bundled in our repo, so the peer runs offline (ours accepts and ignores the option)."""
    from sd_scripts.families.flux.weights import _write_clip_tokenizer, _write_t5_tokenizer

    _write_clip_tokenizer(os.path.join(folder, "openai_clip-vit-large-patch14"))
    _write_t5_tokenizer(os.path.join(folder, "google_t5-v1_1-xxl"))
    return folder


def workload_spec(double: int, single: int, resolution: int, images: int, seed: int, dtype: str,
                  sizes: dict = REAL) -> dict:
    return dict(version=WORKLOAD_VERSION, double=double, single=single, resolution=resolution, images=images,
                seed=seed, dtype=dtype, **sizes)


def build_workload(root: str, spec: dict, log=print) -> dict:
    """Write the workload under `root` (skipped when `root/workload.json` already holds `spec`); returns the paths:
    transformer, clip_l, t5xxl, ae, tokenizers, train_data_dir, plus 'params' (denoiser parameter count)."""
    import torch

    from sd_scripts.families.flux.weights import save_ae, save_clip_l, save_t5xxl
    from sd_scripts.models.safetensors_writer import save_safetensors

    paths = dict(transformer=os.path.join(root, "flux1-bench.safetensors"),
                 clip_l=os.path.join(root, "clip_l.safetensors"), t5xxl=os.path.join(root, "t5xxl.safetensors"),
                 ae=os.path.join(root, "ae.safetensors"), tokenizers=os.path.join(root, "tokenizers"),
                 train_data_dir=os.path.join(root, "train"))
    marker = os.path.join(root, "workload.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("spec") == spec and all(os.path.exists(p) for p in paths.values()):
            return dict(paths, params=done["params"])
        os.remove(marker)
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    if os.path.isdir(paths["train_data_dir"]):
        shutil.rmtree(paths["train_data_dir"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    config = transformer_config(spec["double"], spec["single"], spec["heads"], spec["context_dim"], spec["vec_dim"])
    state = bfl_transformer_state(config, spec["seed"], dtype)
    params = sum(t.numel() for t in state.values())
    save_safetensors(state, paths["transformer"], {"format": "pt", "modelspec.title": "flux1-bench",
                                                   "modelspec.architecture": "flux-1-dev"})
    del state
    clip, t5 = build_text_encoders(spec["seed"], spec["vec_dim"], spec["context_dim"])
    save_clip_l(clip, paths["clip_l"])
    save_t5xxl(t5, paths["t5xxl"])
    save_ae(build_ae(spec["seed"], spec["ae"]), paths["ae"])
    write_tokenizers(paths["tokenizers"])
    make_images(paths["train_data_dir"], spec["images"], spec["resolution"])
    with open(marker, "w") as f:
        json.dump({"spec": spec, "params": params}, f)
    log(f"[flux_lora_step] workload written to {root} in {time.time() - t0:.1f} s "
        f"({params / 1e6:.0f}M denoiser parameters)")
    return dict(paths, params=params)


# ---------------------------------------------------------------- one run


def trainer_args(paths: dict, out: str, *, resolution: int, steps: int, rank: int, t5_tokens: int, precision: str,
                 variant: str, swap: int, extra: list[str]) -> list[str]:
    """The flux_train_network command line both trainers get."""
    mp = "bf16" if variant == "fp8" else precision
    args = ["--pretrained_model_name_or_path", paths["transformer"], "--clip_l", paths["clip_l"],
            "--t5xxl", paths["t5xxl"], "--ae", paths["ae"], "--tokenizer_cache_dir", paths["tokenizers"],
            "--train_data_dir", paths["train_data_dir"], "--output_dir", out, "--output_name", "bench",
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--network_module", "networks.lora_flux", "--network_dim", str(rank), "--network_alpha", str(rank),
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--mixed_precision", mp, "--cache_latents",
            "--cache_text_encoder_outputs", "--t5xxl_max_token_length", str(t5_tokens),
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
            "--guidance_scale", "1.0", "--sdpa", "--seed", "42", "--max_data_loader_n_workers", "0",
            "--caption_extension", ".txt", "--save_model_as", "safetensors"]
    if variant == "swap":
        args += ["--blocks_to_swap", str(swap)]
    elif variant == "fp8":
        args += ["--fp8_base"]
    return args + list(extra)


VARIANT_OPTION = {"base": None, "swap": "blocks_to_swap", "fp8": "fp8_base"}
_TQDM = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def _read_lines(stream, log, lines: list):
    """Collect (harness time, text) for every line or tqdm redraw (\\r) of `stream`, echoing to `log`."""
    buf = b""
    while True:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        now = time.time()
        lines.extend((now, p.decode("utf-8", "replace")) for p in parts if p.strip())
    if buf.strip():
        lines.append((time.time(), buf.decode("utf-8", "replace")))


def run_trainer(trainer: str, *, run_dir: str, paths: dict, peer_dir: str, peer_python: str, device: str,
                threads: int, timeout: float, variant: str, warmup: int, **kw) -> dict:
    """One launch of our trainer or the peer; returns its figures (status completed / refused / failed)."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    out = os.path.join(run_dir, "out")
    events, mem = os.path.join(run_dir, "events.jsonl"), os.path.join(run_dir, "mem.json")
    targs = trainer_args(paths, out, variant=variant, **kw)
    mp = "bf16" if variant == "fp8" else kw["precision"]
    if trainer == "ours":
        python, root, targs = sys.executable, REPO, targs + ["--events_file", events]
    else:
        python, root = peer_python, peer_dir
    launch = [python, "-m", "accelerate.commands.launch"] + (["--cpu"] if device == "cpu" else []) + [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", mp, "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(threads), LAUNCH, trainer, root]
    cmd = launch + targs
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), FLUX_BENCH_MEM_OUT=mem)
    if trainer == "ours":
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env.pop("PYTHONPATH", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    lines: list = []
    t0 = time.time()
    with open(os.path.join(run_dir, "log.txt"), "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, log, lines), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        reader.join(10)
    wall = time.time() - t0
    step_time = {}
    if trainer == "ours" and os.path.isfile(events):
        for line in open(events):
            if line.strip():
                e = json.loads(line)
                if e.get("type") == "progress":
                    step_time.setdefault(int(e["step"]), float(e["time"]))
    if not step_time:  # the peer, or ours without events: its tqdm bar
        for t, text in lines:
            for m in _TQDM.finditer(text):
                if int(m.group(1)) > 0:
                    step_time.setdefault(int(m.group(1)), t)
    result = dict(trainer=trainer, variant=variant, rc=rc, wall_s=round(wall, 1),
                  timing_source="events" if trainer == "ours" and os.path.isfile(events) else "tqdm")
    if os.path.isfile(mem):
        with open(mem) as f:
            result.update(json.load(f))
    lora = os.path.join(out, "bench.safetensors")
    tail = [t for _, t in lines[-40:]]
    option = VARIANT_OPTION[variant]
    if rc != 0 or not os.path.isfile(lora):
        refused = (not step_time and option is not None and any(option in t for t in tail))
        # the reason: the last error line (our trainer names the option in it; sd-scripts' assertions may not)
        reason = next((t.strip() for t in reversed(tail) if re.search(r"Error\b|error:", t)
                       and "CalledProcessError" not in t), None) if refused else None
        result.update(status="refused" if refused else "failed",
                      detail=(reason or " | ".join(t.strip() for t in tail[-4:]))[:600])
        return result
    steps = max(step_time) if step_time else 0
    result["status"] = "completed"
    if 1 in step_time:
        result["time_to_first_step_s"] = round(step_time[1] - t0, 2)
    w = min((s for s in step_time if s >= max(1, warmup)), default=None)
    if w is not None and steps > w:
        result["s_per_step"] = round((step_time[steps] - step_time[w]) / (steps - w), 3)
        result["step_s"] = [round(step_time[s + 1] - step_time[s], 2) for s in sorted(step_time)
                            if s >= w and s + 1 in step_time]
    result["steps_reported"] = len(step_time)
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        result["lora_keys"] = len(list(f.keys()))
    return result


# ---------------------------------------------------------------- pairs and the summary


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


FIGURES = (("s_per_step", "steady s/step"), ("time_to_first_step_s", "time to first step (s)"),
           ("peak_rss_mb", "peak RSS of the trainer (MiB)"), ("cuda_max_allocated_mb", "cuda max allocated (MiB)"),
           ("wall_s", "launch to exit (s)"), ("lora_keys", "LoRA tensors"))


def summarise(variant: str, runs: list[dict], label: str) -> tuple[list[str], dict]:
    ours = [r for r in runs if r["trainer"] == "ours"]
    peer = [r for r in runs if r["trainer"] == "peer"]
    out = [f"== {variant} ({label})"]
    for who, rs in (("ours", ours), ("peer", peer)):
        bad = [r for r in rs if r["status"] != "completed"]
        if bad:
            out.append(f"  {who}: {bad[0]['status']}: {bad[0].get('detail', '')[:300]}")
    summary = {"variant": variant, "n_ours": len(ours), "n_peer": len(peer)}
    pairs = [(o, p) for o, p in zip(ours, peer) if o["status"] == p["status"] == "completed"]
    summary["n_pairs"] = len(pairs)
    rows = []
    for key, name in FIGURES:
        mo = _median(r.get(key) for r in ours if r["status"] == "completed")
        mp = _median(r.get(key) for r in peer if r["status"] == "completed")
        if mo is None and mp is None:
            continue
        per_pair = [o[key] / p[key] for o, p in pairs if o.get(key) and p.get(key)]
        ratio = mo / mp if mo is not None and mp else None
        summary[key] = {"ours": mo, "peer": mp, "ratio": ratio, "pair_ratios": per_pair}
        rng = (f"{statistics.median(per_pair):.2f}x ({min(per_pair):.2f}-{max(per_pair):.2f})" if per_pair else "-")
        rows.append(f"  {name:32s} ours {_fmt(mo):>9s}  peer {_fmt(mp):>9s}  ratio {_fmt(ratio, 'x'):>7s}  "
                    f"per pair {rng}")
    out += rows
    if pairs and all(k in summary for k in ("s_per_step", "time_to_first_step_s", "peak_rss_mb")):
        r = {k: summary[k]["ratio"] for k in ("s_per_step", "time_to_first_step_s", "peak_rss_mb")}
        if all(v is not None for v in r.values()):
            out.append(f"{variant}: ratio s/step {r['s_per_step']:.2f}x, first step {r['time_to_first_step_s']:.2f}x, "
                       f"peak RSS {r['peak_rss_mb']:.2f}x (n={len(pairs)} pairs, {label}; ours/peer, below 1x = "
                       f"ours better)")
    elif ours and peer:
        out.append(f"{variant}: no ratio (ours {ours[0]['status']}, peer {peer[0]['status']})")
    return out, summary


def _fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}" if abs(v) < 1000 else f"{v:.0f}{unit}"


def _cpu_note() -> str:
    try:
        load = os.getloadavg()
        return f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end"
    except OSError:
        return f"{os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=None,
                   help="double and single blocks (default 1 2; --full: 19 38)")
    p.add_argument("--resolution", type=int, default=None, help="px (default 256; --full: 1024)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--t5-tokens", type=int, default=None, help="--t5xxl_max_token_length (default 128; --full: 512)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps before the steady window (step 1 is the first step)")
    p.add_argument("--pairs", type=int, default=3, help="interleaved ours/peer pairs per variant")
    p.add_argument("--first", choices=("ours", "peer"), default="ours")
    p.add_argument("--variants", default="base,swap,fp8")
    p.add_argument("--swap", type=int, default=None,
                   help="--blocks_to_swap N for the swap variant (default 1; --full: 18)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--precision", choices=("no", "bf16"), default=None,
                   help="--mixed_precision of the base/swap variants (default no on the CPU, bf16 on cuda)")
    p.add_argument("--full", action="store_true",
                   help="the full FLUX.1-dev depth at 1024 px, bf16 files, gradient checkpointing (GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default="/tmp/flux-bench")
    p.add_argument("--peer-dir", default="/tmp/peer/sd-scripts")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--no-peer", action="store_true", help="run only our trainer")
    p.add_argument("--peer-only", action="store_true", help="run only sd-scripts (e.g. to check the shim)")
    p.add_argument("--no-peer-alone", action="store_true", help="skip the peer when ours refuses a variant")
    p.add_argument("--extra", default="", help="more trainer arguments for both trainers (one string)")
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args(argv)

    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    double, single = a.blocks or (FULL_BLOCKS if a.full else (1, 2))
    resolution = a.resolution or (1024 if a.full else 256)
    t5_tokens = a.t5_tokens or (512 if a.full else 128)
    precision = a.precision or ("bf16" if a.device == "cuda" else "no")
    swap = a.swap if a.swap is not None else (18 if a.full else 1)
    extra = a.extra.split() + (["--gradient_checkpointing"] if a.full else [])
    spec = workload_spec(double, single, resolution, a.images, a.seed, "bf16" if a.full else "fp32")
    label = f"{double}+{single} blocks @{resolution}px, T5 {t5_tokens} tokens, {a.device}, {precision}"
    root = os.path.join(a.work, f"workload-{double}x{single}-{resolution}-{spec['dtype']}")
    paths = build_workload(root, spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    if a.build_only:
        print(json.dumps(dict(paths, spec=spec)))
        return 0
    peer_ok = not a.no_peer
    if peer_ok and not (os.path.isfile(os.path.join(a.peer_dir, "flux_train_network.py"))
                        and os.path.isfile(a.peer_python)):
        raise SystemExit(f"no sd-scripts tree at {a.peer_dir} or no venv python {a.peer_python}: run "
                         f"bash /work/shared/bench/setup_peer.sh <sd-scripts git dir> {PEER_COMMIT} (or --no-peer)")
    if peer_ok:
        commit_file = os.path.join(a.peer_dir, "PEER_COMMIT")
        commit = open(commit_file).read().strip() if os.path.isfile(commit_file) else "unknown"
        if commit != PEER_COMMIT:
            print(f"[flux_lora_step] warning: peer commit {commit}, not {PEER_COMMIT}", file=sys.stderr)
    kw = dict(paths=paths, peer_dir=a.peer_dir, peer_python=a.peer_python, device=a.device, threads=a.threads,
              timeout=a.timeout, warmup=a.warmup, resolution=resolution, steps=a.steps, rank=a.rank,
              t5_tokens=t5_tokens, precision=precision, swap=swap, extra=extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_root = os.path.join(a.work, f"runs-{stamp}")
    all_lines, summaries, all_runs = [], [], []
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        if variant not in VARIANT_OPTION:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANT_OPTION)}")
        order = [a.first] + (["peer" if a.first == "ours" else "ours"] if peer_ok else [])
        if not peer_ok:
            order = ["ours"]
        elif a.peer_only:
            order = ["peer"]
        runs: list[dict] = []
        refused: set[str] = set()
        for pair in range(1, a.pairs + 1):
            for trainer in order:
                if trainer in refused:
                    continue
                if refused and (a.no_peer_alone or any(r["trainer"] == trainer for r in runs)):
                    continue  # the other side refused: one lone run is enough
                print(f"[flux_lora_step] {variant} pair {pair}/{a.pairs}: {trainer} ...", file=sys.stderr,
                      flush=True)
                r = run_trainer(trainer, run_dir=os.path.join(runs_root, f"{variant}-{pair}-{trainer}"),
                                variant=variant, **kw)
                r["pair"] = pair
                print(json.dumps(r), flush=True)
                with open(os.path.join(runs_root, f"{variant}-{pair}-{trainer}", "result.json"), "w") as f:
                    json.dump(r, f, indent=1)
                runs.append(r)
                if r["status"] == "refused":
                    refused.add(trainer)
                elif r["status"] == "failed":
                    print(f"[flux_lora_step] {trainer} FAILED ({variant}): {r['detail']}", file=sys.stderr)
            if refused and len(refused) == len(order):
                break
        lines, summary = summarise(variant, runs, label.replace(f", {precision}", ", bf16 autocast + fp8 base")
                                   if variant == "fp8" else label)
        all_lines += lines
        summaries.append(summary)
        all_runs += runs
    note = (f"machine: {_cpu_note()}; shared with other jobs, so step times carry that noise. "
            f"peer: sd-scripts {PEER_COMMIT[:7]} via benchmarks/flux_bench_launch.py (text-encoder sizes from the "
            f"files; sd-scripts unchanged).")
    print("\n".join(all_lines + [note]), flush=True)
    with open(os.path.join(runs_root, "summary.json"), "w") as f:
        json.dump({"label": label, "spec": spec, "t5_tokens": t5_tokens, "steps": a.steps, "warmup": a.warmup,
                   "device": a.device, "precision": precision, "params": paths["params"], "summaries": summaries,
                   "runs": all_runs, "note": note}, f, indent=1)
    print(f"[flux_lora_step] runs and summary.json in {runs_root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
