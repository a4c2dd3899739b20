"""Fused backward pass: stepping each parameter inside backward gives the same weights as a plain optimizer step."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch

from sd_scripts.options import OptionError
from sd_scripts.training.fused_backward import FusedBackwardOptimizer, check_fused_backward_options


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 3))


def groups_of(model: torch.nn.Module, lr: float) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr * 3}]


def train(model, optimizer, steps: int, fused: bool, max_grad_norm: float = 0.0, scheduler=None):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if not fused:
            if max_grad_norm:
                for p in model.parameters():  # the per-parameter clipping the fused pass does
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            assert all(p.grad is None for p in model.parameters()), "gradients are freed inside backward"
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_fused_and_plain_adamw_give_the_same_weights(max_grad_norm):
    plain, fused = small_model(), small_model()
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))
    opt_plain = torch.optim.AdamW(groups_of(plain, 1e-2), weight_decay=0.01)
    opt_fused = FusedBackwardOptimizer(torch.optim.AdamW(groups_of(fused, 1e-2), weight_decay=0.01),
                                       max_grad_norm=max_grad_norm)
    sched_plain = torch.optim.lr_scheduler.LambdaLR(opt_plain, lambda s: 1.0 / (1 + s))
    sched_fused = torch.optim.lr_scheduler.LambdaLR(opt_fused, lambda s: 1.0 / (1 + s))
    train(plain, opt_plain, 6, fused=False, max_grad_norm=max_grad_norm, scheduler=sched_plain)
    train(fused, opt_fused, 6, fused=True, max_grad_norm=max_grad_norm, scheduler=sched_fused)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(plain[0].weight, small_model()[0].weight), "training moved the weights"
    # one optimizer state for save_state / resume, with a step count per parameter
    state = opt_fused.state_dict()
    assert len(state["state"]) == len(list(fused.parameters()))
    assert all(int(s["step"]) == 6 for s in state["state"].values())


def test_frozen_parameters_get_no_hook():
    model = small_model()
    model[0].requires_grad_(False)
    opt = FusedBackwardOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = model[0].weight.clone()
    train(model, opt, 2, fused=True)
    assert torch.equal(before, model[0].weight)
    opt.remove_hooks()
    model(torch.randn(2, 6)).sum().backward()
    assert model[4].weight.grad is not None, "without hooks gradients stay"


def _args(**kw):
    base = dict(fused_backward_pass=True, gradient_accumulation_steps=1, mixed_precision="no", full_fp16=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_options_that_need_all_gradients_are_refused():
    check_fused_backward_options(_args())
    check_fused_backward_options(_args(fused_backward_pass=False, gradient_accumulation_steps=4))
    with pytest.raises(OptionError, match="gradient_accumulation_steps"):
        check_fused_backward_options(_args(gradient_accumulation_steps=2))
    with pytest.raises(OptionError, match="fp16"):
        check_fused_backward_options(_args(mixed_precision="fp16"))
