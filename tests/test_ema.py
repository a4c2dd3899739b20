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
