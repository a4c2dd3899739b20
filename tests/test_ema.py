"""EMA of trained weights: the average follows the documented decay schedule and swaps in and out cleanly."""
from __future__ import annotations

import torch

from sd_scripts.training.ema import TrainedWeightsEMA, ema_decay_at


def test_decay_schedule():
    assert ema_decay_at(1, 0.9999) == 0.0
    assert ema_decay_at(2, 0.9999) == 2 / 11
    assert ema_decay_at(10, 0.9999) == 10 / 19
    assert ema_decay_at(1000, 0.5) == 0.5


def test_ema_after_n_steps_matches_the_formula():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    decay = 0.6
    ema = TrainedWeightsEMA(module.parameters(), decay=decay)
    expected = [p.detach().clone() for p in module.parameters()]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for step in range(1, 8):
        module(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        d = min(decay, step / (step + 9)) if step > 1 else 0.0
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, module.parameters())]
    assert ema.steps == 7
    for got, want in zip(ema.averaged(), expected):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(ema.averaged()[0], module.weight), "the average lags the raw weights"


def test_swapped_in_restores_raw_weights():
    module = torch.nn.Linear(3, 2)
    ema = TrainedWeightsEMA(module.parameters(), decay=0.9)
    raw = module.weight.detach().clone()
    ema.update()  # first step: decay 0, the average is the raw weights
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update()  # second step: decay 2/11, the average moves towards the shifted weights
    shifted = module.weight.detach().clone()
    with ema.swapped_in():
        inside = module.weight.detach().clone()
    assert torch.equal(module.weight, shifted)
    torch.testing.assert_close(inside, raw * 2 / 11 + shifted * 9 / 11)


# ---------------------------------------------------------------- a real run saves the average
def _train_db(model: str, data: str, out_dir, *options: str) -> None:
    """An in-process DreamBooth run of the real trainer entry point (3 steps, batch 1, tiny SD1 model)."""
    from sd_scripts.train_db import main

    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", str(out_dir),
            "--output_name", "m", "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "3",
            "--learning_rate", "1e-3", "--seed", "5", *options]
    assert main(argv) == 0


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_use_ema_saves_the_average_of_the_raw_weights(tiny_sd1, demo_data, tmp_path):
    """The same seeded run twice: without EMA, saving the raw weights w1, w2, w3 after each step; with use_ema and
    ema_decay 0.2, saving once at the end. That file must hold e3, where e1 = w1 and e_n = d_n e_(n-1) + (1 - d_n) w_n
    with d_n = min(ema_decay, n / (n + 9)) (d_2 = 2/11, d_3 = 0.2: the cap applies)."""
    model = tiny_sd1.single_file
    _train_db(model, demo_data, tmp_path / "raw", "--save_every_n_steps", "1")
    raw = [_tensors(tmp_path / "raw" / name) for name in ("m-step00000001.safetensors",
                                                          "m-step00000002.safetensors", "m.safetensors")]
    _train_db(model, demo_data, tmp_path / "ema", "--use_ema", "--ema_decay", "0.2")
    saved = _tensors(tmp_path / "ema" / "m.safetensors")

    decays = [min(0.2, n / (n + 9)) if n > 1 else 0.0 for n in (1, 2, 3)]
    assert decays[1] == 2 / 11 and decays[2] == 0.2
    assert saved.keys() == raw[2].keys()
    moved = 0
    for key, value in saved.items():
        average = raw[0][key].double()
        for decay, weights in zip(decays[1:], raw[1:]):
            average = decay * average + (1 - decay) * weights[key].double()
        torch.testing.assert_close(value.double(), average, rtol=1e-5, atol=1e-6, msg=key)
        if key.startswith("model.diffusion_model.") and (raw[2][key] - average).abs().max() > 1e-4:
            moved += 1
    assert moved > 10, "precondition: the average differs from the last raw weights"
