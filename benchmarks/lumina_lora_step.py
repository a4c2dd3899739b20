"""Lumina Image 2.0 LoRA training step: our `python -m sd_scripts.lumina_train_network` beside sd-scripts'
`lumina_train_network.py` (kohya-ss/sd-scripts 48d368f) on the same reduced model, interleaved (ours, peer, ours,
...). Prints s/step (steady), time to first step, peak RSS and the ratios ours/peer (the table and summary lines of
flux_lora_step.py, whose helpers this uses).

The workload (random weights, seeded, offline; built once under --work and reused):
  denoiser  the Lumina-Image-2.0 NextDiT at the REAL width: hidden 2304 = 24 heads x 96 (8 kv heads), RoPE 32/32/32,
            FFN 9216, caption width 2304, the real 2 noise + 2 context refiner blocks, but FEWER main blocks
            (--layers, default 1 of 26). One Alpha-VLLM single file (sd-scripts' layout).
  gemma2    Gemma-2 with the real output width 2304 (8 heads of 256, 4 kv heads) but 1 layer and a 512-wide MLP,
            and the vocabulary of the tiny model's TEST tokenizer (sentencepiece, trained at build time: Gemma's own
            is not shipped); both trainers cache its outputs (--cache_text_encoder_outputs), so it runs once per
            caption before the loop. The tokenizer is written as a Hugging Face cache for google/gemma-2-2b under
            --tokenizer_cache_dir (what sd-scripts reads offline; ours reads the same folder).
  ae        the real FLUX.1 autoencoder architecture (16 channels), random weights; latents cached before the loop.
  images    --images (default 4) synthetic captioned images at --resolution (default 256 px).

Options, identical for both: networks.lora_lumina rank 16 / alpha 16 on the denoiser (--network_train_unet_only),
AdamW lr 1e-4 constant, batch 1, --cache_latents, --cache_text_encoder_outputs, --gemma2_max_token_length 64,
sd-scripts' Lumina defaults (timestep_sampling shift, discrete_flow_shift 6.0, model_prediction_type raw), --sdpa,
seed 42, 0 DataLoader workers, fp32 on the CPU (--mixed_precision no). Each run is
`accelerate launch [--cpu] benchmarks/lumina_bench_launch.py ours|peer ...`.

    .venv/bin/python benchmarks/lumina_lora_step.py --pairs 2 --steps 4
    .venv/bin/python benchmarks/lumina_lora_step.py --build-only
    .venv/bin/python benchmarks/lumina_lora_step.py --device cuda --layers 26 --resolution 1024 --pairs 2 --steps 6

Writes under --work (default /tmp/lumina-bench): the workload, one folder per run (log.txt, command.txt,
events.jsonl, mem.json) and summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
LAUNCH = os.path.join(REPO, "benchmarks", "lumina_bench_launch.py")
GEMMA_SNAPSHOT = "0" * 39 + "1"
_TQDM = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")


def build_workload(root: str, layers: int, resolution: int, images: int, seed: int) -> dict:
    """Write (or reuse) the files; returns their paths."""
    import torch

    from flux_lora_step import make_images
    from sd_scripts.families.flux.layout import AE_CONFIG
    from sd_scripts.families.flux.weights import save_ae
    from sd_scripts.families.lumina import layout
    from sd_scripts.families.lumina.tiny import train_test_tokenizer
    from sd_scripts.families.lumina.weights import (build_gemma2, build_transformer, save_gemma2, save_transformer,
                                                    tokenizer_from_model_bytes, write_tokenizer_folder)
    from sd_scripts.families.sd.loading import build_vae

    spec = dict(layers=layers, resolution=resolution, images=images, seed=seed)
    paths = {k: os.path.join(root, v) for k, v in (("transformer", "lumina-bench.safetensors"),
                                                   ("gemma2", "gemma2-bench.safetensors"), ("ae", "ae.safetensors"),
                                                   ("tokenizers", "hf-cache"), ("data", "data"))}
    stamp = os.path.join(root, "spec.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == spec:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    torch.manual_seed(seed)
    spiece = train_test_tokenizer(seed)
    repo = os.path.join(paths["tokenizers"], "models--google--gemma-2-2b")
    write_tokenizer_folder(os.path.join(repo, "snapshots", GEMMA_SNAPSHOT), spiece)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(GEMMA_SNAPSHOT)
    transformer = build_transformer(dict(layout.LUMINA2_CONFIG, num_layers=layers), meta=False)
    save_transformer(transformer, paths["transformer"])
    del transformer
    vocab = len(tokenizer_from_model_bytes(spiece))
    gemma = build_gemma2(dict(layout.GEMMA2_CONFIG, num_hidden_layers=1, intermediate_size=512, vocab_size=vocab))
    gemma.load_state_dict({k: torch.randn(v.shape) * 0.02 if v.ndim > 1 else torch.zeros(v.shape)
                           for k, v in gemma.state_dict().items()}, assign=True)
    save_gemma2(gemma, paths["gemma2"])
    save_ae(build_vae(AE_CONFIG, meta=False), paths["ae"])
    make_images(paths["data"], images, resolution)
    with open(stamp, "w") as f:
        json.dump(spec, f)
    return paths


def trainer_args(paths: dict, out: str, *, resolution: int, steps: int, device: str) -> list[str]:
    return ["--pretrained_model_name_or_path", paths["transformer"], "--gemma2", paths["gemma2"], "--ae", paths["ae"],
            "--tokenizer_cache_dir", paths["tokenizers"], "--train_data_dir", paths["data"], "--output_dir", out,
            "--output_name", "bench", "--resolution", str(resolution), "--max_train_steps", str(steps),
            "--network_module", "networks.lora_lumina", "--network_dim", "16", "--network_alpha", "16",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--train_batch_size", "1", "--cache_latents",
            "--cache_text_encoder_outputs", "--gemma2_max_token_length", "64", "--sdpa", "--seed", "42",
            "--max_data_loader_n_workers", "0", "--caption_extension", ".txt", "--save_model_as", "safetensors",
            *(["--gradient_checkpointing"] if device != "cpu" else [])]


def run_trainer(trainer: str, *, run_dir: str, paths: dict, peer_dir: str, peer_python: str, device: str,
                threads: int, timeout: float, warmup: int, **kw) -> dict:
    from flux_lora_step import _read_lines

    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    out, events, mem = (os.path.join(run_dir, n) for n in ("out", "events.jsonl", "mem.json"))
    targs = trainer_args(paths, out, device=device, **kw)
    python, root = (sys.executable, REPO) if trainer == "ours" else (peer_python, peer_dir)
    if trainer == "ours":
        targs += ["--events_file", events]
    cmd = [python, "-m", "accelerate.commands.launch", *(["--cpu"] if device == "cpu" else []), "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no" if device == "cpu" else "bf16", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads), LAUNCH, trainer, root, *targs]
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), LUMINA_BENCH_MEM_OUT=mem)
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
            if line.strip() and json.loads(line).get("type") == "progress":
                e = json.loads(line)
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
        result.update(status="failed", detail=" | ".join(t.strip() for _, t in lines[-6:])[:800])
        return result
    steps = max(step_time) if step_time else 0
    result["status"] = "completed"
    if 1 in step_time:
        result["time_to_first_step_s"] = round(step_time[1] - t0, 2)
    w = min((s for s in step_time if s >= max(1, warmup)), default=None)
    if w is not None and steps > w:
        result["s_per_step"] = round((step_time[steps] - step_time[w]) / (steps - w), 3)
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        keys = sorted(f.keys())
    result["lora_keys"] = len(keys)
    result["lora_names_sha"] = __import__("hashlib").sha256("\n".join(keys).encode()).hexdigest()[:12]
    return result


def main(argv: list[str] | None = None) -> int:
    from flux_lora_step import _cpu_note, summarise

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/lumina-bench")
    p.add_argument("--peer-dir", default="/tmp/peer/sd-scripts")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    a = p.parse_args(argv)
    paths = build_workload(os.path.join(a.work, "workload"), a.layers, a.resolution, a.images, a.seed)
    if a.build_only:
        print(json.dumps(paths, indent=1))
        return 0
    runs = []
    for i in range(a.pairs):
        for trainer in ("ours",) + (() if a.no_peer else ("peer",)):
            r = run_trainer(trainer, run_dir=os.path.join(a.work, f"run-{i}-{trainer}"), paths=paths,
                            peer_dir=a.peer_dir, peer_python=a.peer_python, device=a.device, threads=a.threads,
                            timeout=a.timeout, warmup=a.warmup, resolution=a.resolution, steps=a.steps)
            print(json.dumps(r), flush=True)
            runs.append(r)
    label = f"{a.device}, {a.layers} of 26 main blocks at width 2304, {a.resolution} px, {a.steps} steps; {_cpu_note()}"
    lines, summary = summarise("base", runs, label)
    same_names = len({r.get("lora_names_sha") for r in runs if r["status"] == "completed"}) == 1
    lines.append(f"LoRA files of both trainers have the same tensor names: {same_names}")
    print("\n".join(lines))
    with open(os.path.join(a.work, "summary.json"), "w") as f:
        json.dump({"summary": summary, "runs": runs, "same_lora_names": same_names}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
