"""The optimizer options in a real run: the Trainer built in-process on the tiny SD 1.x model (as test_loop_step.py
does) takes the optimizer, learning rates and schedule the options name, and a schedule-free optimizer's averaged
weights are what is saved, with its state resumed exactly. Plus text_encoder_lr with one rate per text encoder."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from test_loop_step import build_trainer, data, first_batch  # noqa: F401 - `data` is a fixture

pytestmark = pytest.mark.timeout(300)


def _trained(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters() if p.requires_grad}


def test_optimizer_learning_rates_and_schedule_reach_the_step(tiny_sd1, data, tmp_path):  # noqa: F811
    """Lion's first step moves every weight with a gradient by exactly its group's learning rate (sign update, no
    weight decay): unet_lr for the U-Net LoRA, text_encoder_lr for the text encoder's; the schedule
    (cosine_with_min_lr) then sets each group's rate from its own peak."""
    unet_lr, te_lr, min_ratio = 2e-3, 5e-4, 0.1
    trainer = build_trainer("network", tiny_sd1.diffusers_dir, data, tmp_path / "out",
                            "--optimizer_type", "Lion", "--optimizer_args", "weight_decay=0.0", "betas=0.9,0.99",
                            "--unet_lr", str(unet_lr), "--text_encoder_lr", str(te_lr), "--learning_rate", "1e-5",
                            "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", str(min_ratio),
                            "--max_grad_norm", "0", "--train_batch_size", "1")
    import lion_pytorch

    inner = trainer.optimizer.optimizer
    assert isinstance(inner, lion_pytorch.Lion) and inner.defaults["betas"] == (0.9, 0.99)
    assert trainer.lr_names == ["unet", "textencoder"]
    before = _trained(trainer)
    trainer.training_step(first_batch(trainer))
    after = _trained(trainer)
    moved = {"unet": 0, "te": 0}
    for name, old in before.items():
        lr = te_lr if name.startswith("lora_te") else unet_lr
        step = (after[name] - old).abs()
        changed = step > 0
        torch.testing.assert_close(step[changed], torch.full_like(step[changed], lr), rtol=1e-3, atol=0, msg=name)
        moved["te" if name.startswith("lora_te") else "unet"] += int(changed.sum())
    assert moved["unet"] > 0 and moved["te"] > 0, moved
    factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * 1 / trainer.plan.total_steps))
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([unet_lr * factor, te_lr * factor], rel=1e-9)


def test_schedule_free_run_saves_the_averaged_weights_and_resumes_exactly(tiny_sd1, data, tmp_path):  # noqa: F811
    """AdamWScheduleFree trains at y and keeps z; the weights meant for use are x, with y = (1 - b1) z + b1 x.
    The saved LoRA holds x; training goes on at y; a run resumed from the state folder continues exactly."""
    options = ("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "0.05", "--optimizer_args",
               "warmup_steps=0", "betas=0.8,0.99", "--save_state", "--max_train_steps", "4", "--train_batch_size", "1")
    trainer = build_trainer("network", tiny_sd1.diffusers_dir, data, tmp_path / "out", *options)
    batch = first_batch(trainer)
    for _ in range(2):  # after one step x = y = z (the first average is the first iterate)
        trainer.training_step(batch)
    trainer.global_step = trainer.epoch = 2
    train_weights = _trained(trainer)
    inner = trainer.optimizer.optimizer
    z = {n: inner.state[p]["z"].clone() for n, p in trainer.module.named_parameters() if p.requires_grad}
    trainer.save_model(step=2)

    saved = load_file(os.path.join(trainer.args.output_dir, "last-step00000002.safetensors"))
    averaged = {n: (y - 0.2 * z[n]) / 0.8 for n, y in train_weights.items()}  # x = (y - (1 - b1) z) / b1
    differs = 0
    for name, x in averaged.items():
        torch.testing.assert_close(saved[name], x, rtol=1e-4, atol=1e-6, msg=name)
        differs += int(not torch.allclose(saved[name], train_weights[name]))
    assert differs > 0, "the averaged weights differ from the training point"
    for name, y in _trained(trainer).items():  # back at the training point after saving
        torch.testing.assert_close(y, train_weights[name], rtol=1e-6, atol=1e-7)
    assert all(g["train_mode"] for g in inner.param_groups)

    # one more step, then back to the saved state (weights, optimizer, schedule and noise generator): the same step
    trainer.training_step(batch)
    after_three = _trained(trainer)
    trainer.args.resume = os.path.join(trainer.args.output_dir, "last-step00000002-state")
    trainer.resume_state()
    assert trainer.global_step == 2 and all(g["train_mode"] for g in inner.param_groups)
    for name, y in _trained(trainer).items():
        torch.testing.assert_close(y, train_weights[name], rtol=1e-6, atol=1e-7)
    trainer.training_step(batch)
    for name, y in _trained(trainer).items():
        assert torch.equal(y, after_three[name]), name


def test_text_encoder_lr_gives_each_text_encoder_its_rate():
    """sd-scripts' multi-encoder networks: one rate per encoder, the last repeating; 0 leaves an encoder out."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.networks.lora import LoRANetwork
    from sd_scripts.options import parse_args
    from sd_scripts.training.methods import NetworkMethod

    config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                  max_position_embeddings=8)
    encoders = [CLIPTextModel(CLIPTextConfig(**config)) for _ in range(3)]
    net = LoRANetwork(None, encoders, te_prefixes=("lora_te1", "lora_te2", "lora_te3"), train_unet=False)
    per_encoder = {i: {id(p) for m in net.text_encoder_loras if m.te_index == i for p in m.parameters()}
                   for i in range(3)}

    def groups(rates):
        out, names = net.prepare_optimizer_params(None, rates, 1e-3)
        return {name: (g["lr"], {id(p) for p in g["params"]}) for name, g in zip(names, out)}

    got = groups([1e-4, 5e-5])
    assert got == {"textencoder1": (1e-4, per_encoder[0]), "textencoder2": (5e-5, per_encoder[1]),
                   "textencoder3": (5e-5, per_encoder[2])}
    assert groups([2e-4]) == {"textencoder": (2e-4, per_encoder[0] | per_encoder[1] | per_encoder[2])}
    assert groups(None) == {"textencoder": (1e-3, per_encoder[0] | per_encoder[1] | per_encoder[2])}
    assert groups([1e-4, 0.0, 3e-5]) == {"textencoder1": (1e-4, per_encoder[0]), "textencoder3": (3e-5, per_encoder[2])}
    # the option: several values on the command line, a single TOML number, and 0 for all trains no text encoder
    args = parse_args("network", ["--text_encoder_lr", "1e-4", "5e-5"])
    assert args.text_encoder_lr == [1e-4, 5e-5] and NetworkMethod(args).trains_text_encoder
    assert not NetworkMethod(parse_args("network", ["--text_encoder_lr", "0", "0"])).trains_text_encoder
    with pytest.raises(Exception, match="text_encoder_lr"):
        parse_args("network", ["--text_encoder_lr", "-1"])


def test_fused_backward_pass_with_adafactor_steps_each_weight_like_adafactor(tiny_sd1, data, tmp_path):  # noqa: F811
    """sd-scripts' fused_backward_pass optimizer in a real DreamBooth step: transformers' Adafactor (relative_step, its
    own step size) applied to each U-Net weight with that weight's gradient clipped on its own; the adafactor
    schedule reports its step size."""
    from transformers.optimization import Adafactor

    from test_loop_step import (clip_coefficient, denoiser, hand_gradients, observe_step, step_on,
                                trained_denoiser_parameters)

    max_norm = 0.05
    trainer, batch = step_on("db", tiny_sd1.diffusers_dir, data, tmp_path, "--optimizer_type", "Adafactor",
                             "--fused_backward_pass", "--learning_rate_te", "0", "--max_grad_norm", str(max_norm))
    reference = copy.deepcopy(denoiser(trainer))
    seen = observe_step(trainer, batch)
    grads = hand_gradients(reference, seen, batch)
    expected = trained_denoiser_parameters(reference)
    adafactor = Adafactor(list(expected.values()), lr=None)  # relative_step=True, scale_parameter=True
    for name, p in expected.items():
        p.grad = grads[name] * clip_coefficient(float(grads[name].double().norm()), max_norm)
    adafactor.step()
    after = trained_denoiser_parameters(denoiser(trainer))
    for name, p in expected.items():
        torch.testing.assert_close(after[name].detach(), p.detach(), rtol=1e-3, atol=1e-6, msg=name)
    assert type(trainer.lr_scheduler).__name__ == "AdafactorSchedule" and trainer.lr_scheduler.get_last_lr()
