"""HunyuanImage-2.1 LoRA training step: our `python -m sd_scripts.hunyuan_image_train_network` beside sd-scripts'
`hunyuan_image_train_network.py` (48d368f) on the same reduced model, interleaved (ours, peer, ours, ...). Prints
s/step (steady), time to first step, peak RSS and the ratios ours/peer (summary format of flux_lora_step.py).

The workload (random weights, seeded, offline; built once under --work):
  DiT       the REAL block width: hidden 3584 = 28 heads x 128, RoPE 64/64, 64 latent channels, the token refiner
            (2 blocks, as sd-scripts fixes it) and the byT5 mapper at their real sizes, but FEWER blocks (default
            1 double + 1 single; --blocks D S). Official layout (`hunyuanimage2.1-bench.safetensors`), bfloat16.
  Qwen2.5-VL the real output width 3584, vocabulary and heads, but 2 layers (the third-last hidden state needs 2),
            a narrow MLP and a 1-block vision tower (sd-scripts loads the whole VL model strictly); bfloat16, in the
            released file's layout (`model.*`, `visual.*`, `lm_head`).
  byT5      the real width 1472 and vocabulary (1,510 with the colour / font tokens), 1 layer.
  VAE       the real HunyuanImage-2.1 VAE architecture (32x, 64 channels), float16.
  Both trainers cache latents and text-encoder outputs before the loop, so the encoders are not what a step
  measures. sd-scripts builds its models at the released sizes; benchmarks/hunyuan_bench_launch.py sets them from
  the files (see there) and points its Hub tokenizer ids at local copies of the same tokenizers.
Options, identical for both: LoRA (networks.lora_hunyuan_image) rank 16 / alpha 16, AdamW lr 1e-4 constant, batch 1,
--cache_latents, --cache_text_encoder_outputs, the script's flow-matching defaults (sigma sampling, shift 5.0, raw
prediction), --sdpa, seed 42, 0 DataLoader workers, --mixed_precision no on the CPU (bf16 on cuda).

    .venv/bin/python benchmarks/hunyuan_image_lora_step.py --pairs 2 --steps 3
    .venv/bin/python benchmarks/hunyuan_image_lora_step.py --build-only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from flux_lora_step import _TQDM, _cpu_note, _read_lines, make_images, summarise  # noqa: E402

LAUNCH = os.path.join(REPO, "benchmarks", "hunyuan_bench_launch.py")
PEER_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
WORKLOAD_VERSION = 1


def _random_state(module, seed: int, component: str, dtype) -> dict:
    from sd_scripts.tools.tiny_model import random_tensor

    return {n: random_tensor(seed, f"{component}:{n}", tuple(p.shape), p.ndim == 1 and n.endswith(".weight")).to(dtype)
            for n, p in module.state_dict().items()}


def build_workload(root: str, double: int, single: int, resolution: int, images: int, seed: int) -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

    from sd_scripts.families.hunyuan_image import layout, weights
    from sd_scripts.models.module_io import save_safetensors_atomic
    from sd_scripts.models.qwen_tokenizer import QWEN_TOKENIZER_DIR
    from sd_scripts.models.t5 import T5_XXL_CONFIG

    spec = dict(version=WORKLOAD_VERSION, double=double, single=single, resolution=resolution, images=images, seed=seed)
    paths = dict(dit=os.path.join(root, "hunyuanimage2.1-bench.safetensors"),
                 qwen=os.path.join(root, "qwen.safetensors"),
                 byt5=os.path.join(root, "byt5.safetensors"), vae=os.path.join(root, "vae.safetensors"),
                 tokenizers=os.path.join(root, "tokenizers"), train=os.path.join(root, "train"))
    marker = os.path.join(root, "workload.json")
    if os.path.isfile(marker) and json.load(open(marker)).get("spec") == spec:
        return paths
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    bf16 = torch.bfloat16
    dit = weights.build_dit(dict(layout.REAL_CONFIG, num_layers=double, num_single_layers=single))
    dit.load_state_dict(_random_state(dit, seed, "dit", bf16), assign=True)
    weights.save_dit(dit, paths["dit"], dtype=bf16, metadata={"modelspec.title": "hunyuanimage2.1-bench"})
    del dit
    text = dict(hidden_size=3584, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"type": "default", "mrope_section": [16, 24, 24]})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=3584,
                  fullatt_block_indexes=[0])
    with init_empty_weights():
        vl = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    state = _random_state(vl, seed, "qwen", bf16)
    renamed = {}
    for k, v in state.items():  # transformers 5 names -> the released file's
        k = k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        renamed[k] = v
    save_safetensors_atomic(renamed, paths["qwen"])
    del vl, state, renamed
    with init_empty_weights():
        byt5 = T5EncoderModel(T5Config(**dict(T5_XXL_CONFIG, d_model=1472, d_kv=64, num_heads=6, d_ff=3584,
                                              num_layers=1, vocab_size=1510)))
    state = _random_state(byt5, seed, "byt5", torch.float16)
    state.pop("encoder.embed_tokens.weight")
    save_safetensors_atomic(state, paths["byt5"])
    with init_empty_weights():
        vae = AutoencoderKLHunyuanImage(**layout.VAE_CONFIG)
    vae.load_state_dict(_random_state(vae, seed, "vae", torch.float16), assign=True)
    weights.save_vae(vae, paths["vae"])
    qwen_tok, byt5_tok = os.path.join(paths["tokenizers"], "qwen"), os.path.join(paths["tokenizers"], "byt5")
    shutil.copytree(QWEN_TOKENIZER_DIR, qwen_tok, dirs_exist_ok=True)
    os.makedirs(byt5_tok, exist_ok=True)
    with open(os.path.join(byt5_tok, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "ByT5Tokenizer"}, f)  # 384 ids, as google/byt5-small
    if os.path.isdir(paths["train"]):
        shutil.rmtree(paths["train"])
    make_images(paths["train"], images, resolution)
    with open(marker, "w") as f:
        json.dump({"spec": spec}, f)
    print(f"[hunyuan_image_lora_step] workload written to {root} in {time.time() - t0:.0f} s", file=sys.stderr)
    return paths


def trainer_args(paths: dict, out: str, *, resolution: int, steps: int, rank: int, precision: str,
                 extra: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", paths["dit"], "--text_encoder", paths["qwen"], "--byt5", paths["byt5"],
            "--vae", paths["vae"], "--tokenizer_cache_dir", paths["tokenizers"], "--train_data_dir", paths["train"],
            "--output_dir", out, "--output_name", "bench", "--resolution", str(resolution), "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--network_module", "networks.lora_hunyuan_image", "--network_dim",
            str(rank), "--network_alpha", str(rank), "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--mixed_precision", precision,
            "--cache_latents", "--cache_text_encoder_outputs", "--sdpa", "--seed", "42",
            "--max_data_loader_n_workers", "0", "--caption_extension", ".txt", "--save_model_as", "safetensors",
            *extra]


def run_trainer(trainer: str, *, run_dir: str, paths: dict, peer_dir: str, peer_python: str, device: str,
                threads: int, timeout: float, warmup: int, **kw) -> dict:
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    out, events, mem = (os.path.join(run_dir, n) for n in ("out", "events.jsonl", "mem.json"))
    targs = trainer_args(paths, out, **kw)
    python, root = (sys.executable, REPO) if trainer == "ours" else (peer_python, peer_dir)
    if trainer == "ours":
        targs += ["--events_file", events]
    cmd = [python, "-m", "accelerate.commands.launch"] + (["--cpu"] if device == "cpu" else []) + [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", kw["precision"], "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(threads), LAUNCH, trainer, root] + targs
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
    step_time: dict[int, float] = {}
    if trainer == "ours" and os.path.isfile(events):
        for line in open(events):
            if line.strip() and (e := json.loads(line)).get("type") == "progress":
                step_time.setdefault(int(e["step"]), float(e["time"]))
    if not step_time:
        for t, text in lines:
            for m in _TQDM.finditer(text):
                if int(m.group(1)) > 0:
                    step_time.setdefault(int(m.group(1)), t)
    result = dict(trainer=trainer, variant="base", rc=rc, wall_s=round(time.time() - t0, 1))
    if os.path.isfile(mem):
        result.update(json.load(open(mem)))
    lora = os.path.join(out, "bench.safetensors")
    if rc != 0 or not os.path.isfile(lora):
        result.update(status="failed", detail=" | ".join(t.strip() for _, t in lines[-6:])[:600])
        return result
    result["status"] = "completed"
    steps = max(step_time) if step_time else 0
    if 1 in step_time:
        result["time_to_first_step_s"] = round(step_time[1] - t0, 2)
    w = min((s for s in step_time if s >= max(1, warmup)), default=None)
    if w is not None and steps > w:
        result["s_per_step"] = round((step_time[steps] - step_time[w]) / (steps - w), 3)
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        result["lora_keys"] = len(list(f.keys()))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=(1, 1))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default="/tmp/hunyuan-bench")
    p.add_argument("--peer-dir", default="/tmp/peer/sd-scripts")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-only", action="store_true")
    p.add_argument("--extra", default="")
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args(argv)
    double, single = a.blocks
    root = os.path.join(a.work, f"workload-{double}x{single}-{a.resolution}")
    paths = build_workload(root, double, single, a.resolution, a.images, a.seed)
    if a.build_only:
        print(json.dumps(paths))
        return 0
    precision = "bf16" if a.device == "cuda" else "no"
    who = ["peer"] if a.peer_only else ["ours"] if a.no_peer else ["ours", "peer"]
    runs = []
    kw = dict(paths=paths, peer_dir=a.peer_dir, peer_python=a.peer_python, device=a.device, threads=a.threads,
              timeout=a.timeout, warmup=a.warmup, resolution=a.resolution, steps=a.steps, rank=a.rank,
              precision=precision, extra=a.extra.split())
    for i in range(a.pairs):
        for trainer in who:
            r = run_trainer(trainer, run_dir=os.path.join(a.work, "runs", f"{i}-{trainer}"), **kw)
            print(json.dumps(r), flush=True)
            runs.append(r)
    label = f"{double}+{single} blocks @{a.resolution}px, {a.device}, {precision}; {_cpu_note()}"
    lines, summary = summarise("base", runs, label)
    print("\n".join(lines))
    with open(os.path.join(a.work, "summary.json"), "w") as f:
        json.dump({"runs": runs, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
