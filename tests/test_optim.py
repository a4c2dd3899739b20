"""Tests for sd_scripts.training.optim: optimizer args, AdamW(8bit) creation and learning-rate schedules."""
import math

import pytest
import torch

from sd_scripts.options import OptionError
from sd_scripts.training.optim import (bitsandbytes_problem, create_lr_scheduler, create_optimizer,
                                       parse_optimizer_args, warmup_steps)


def test_parse_optimizer_args_literals():
    assert parse_optimizer_args(None) == {}
    assert parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.99", "amsgrad=True", "eps=1e-6",
                                 "name='x'"]) == {"weight_decay": 0.01, "betas": (0.9, 0.99), "amsgrad": True,
                                                  "eps": 1e-6, "name": "x"}
    assert parse_optimizer_args(["betas=(0.8, 0.9)"]) == {"betas": (0.8, 0.9)}


@pytest.mark.parametrize("items, words", [
    (["weight_decay"], ["optimizer_args", "key=value"]),
    (["weight_decay=abc"], ["optimizer_args", "weight_decay=abc", "literal"]),
    (["=1"], ["optimizer_args", "no name"]),
])
def test_parse_optimizer_args_errors(items, words):
    with pytest.raises(OptionError) as err:
        parse_optimizer_args(items)
    assert all(w in str(err.value) for w in words)


def _param(value=1.0):
    return torch.nn.Parameter(torch.tensor([value]))


def test_adamw_one_step_on_hand_numbers():
    p = _param(1.0)
    opt = create_optimizer("AdamW", ["weight_decay=0.5", "betas=0.9,0.99"], [p], 0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0.5
    p.grad = torch.tensor([2.0])
    opt.step()
    # first Adam step moves by lr * sign(grad); decoupled decay first: 1 * (1 - 0.1 * 0.5) - 0.1 = 0.85
    assert p.item() == pytest.approx(0.85, abs=1e-6)


def test_param_groups_keep_their_own_lr_and_name_is_case_insensitive():
    a, b = _param(), _param()
    opt = create_optimizer("adamw", None, [{"params": [a], "lr": 0.5}, {"params": [b]}], 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]
    assert opt.defaults["weight_decay"] == 0.01  # torch's (and sd-scripts') default


@pytest.mark.parametrize("args, words", [
    (["momentum=0.9"], ["optimizer_args", "'momentum'", "weight_decay"]),
    (["lr=0.1"], ["learning_rate"]),
    (["betas=1.5,0.9"], ["optimizer_args", "beta"]),
])
def test_bad_optimizer_args_name_the_problem(args, words):
    with pytest.raises(OptionError) as err:
        create_optimizer("AdamW", args, [_param()], 1e-3)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_optimizer_type():
    with pytest.raises(OptionError, match="optimizer_type.*Lion"):
        create_optimizer("Lion", None, [_param()], 1e-3)


def test_adamw8bit_works_or_says_to_use_adamw():
    p = torch.nn.Parameter(torch.ones(4096))
    if bitsandbytes_problem("cpu") is None:
        opt = create_optimizer("AdamW8bit", ["weight_decay=0.0"], [p], 1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        assert p.detach().sub(1 - 1e-3).abs().max() < 1e-4
    else:
        with pytest.raises(OptionError) as err:
            create_optimizer("AdamW8bit", None, [p], 1e-3)
        assert "bitsandbytes" in str(err.value) and "optimizer_type=AdamW" in str(err.value)


def test_warmup_steps():
    assert warmup_steps(0, 100) == 0 and warmup_steps(None, 100) == 0
    assert warmup_steps(5, 100) == 5
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.25, 10) == 2  # floored, as sd-scripts
    assert warmup_steps(3.0, 100) == 3


def _lrs(name, steps, warmup, **kw):
    opt = torch.optim.SGD([_param()], lr=1.0)
    sched = create_lr_scheduler(name, opt, num_training_steps=10, num_warmup_steps=warmup, **kw)
    lrs = []
    for _ in range(11):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return [lrs[s] for s in steps]


STEPS = [0, 1, 2, 4, 6, 8, 10]
C45 = 0.5 * (1 + math.cos(math.pi / 4))  # 0.853553...


@pytest.mark.parametrize("warmup", [2, 0.2, 0.25])  # all mean 2 warmup steps of 10
@pytest.mark.parametrize("name, kw, expected", [
    ("constant_with_warmup", {}, [0, 0.5, 1, 1, 1, 1, 1]),
    ("linear", {}, [0, 0.5, 1, 0.75, 0.5, 0.25, 0]),
    ("cosine", {}, [0, 0.5, 1, C45, 0.5, 1 - C45, 0]),
    ("cosine_with_restarts", {"num_cycles": 2}, [0, 0.5, 1, 0.5, 1, 0.5, 0]),
    ("polynomial", {"power": 2.0}, [0, 0.5, 1, 0.5625, 0.25, 0.0625, 1e-7]),
])
def test_schedules_on_hand_numbers(name, kw, expected, warmup):
    assert _lrs(name, STEPS, warmup, **kw) == pytest.approx(expected, abs=1e-6)


def test_constant_schedule_and_its_warmup_rule():
    assert _lrs("constant", STEPS, 0) == [1.0] * len(STEPS)
    for warmup in (2, 0.5):
        with pytest.raises(OptionError, match="lr_warmup_steps.*constant_with_warmup"):
            _lrs("constant", STEPS, warmup)
    assert _lrs("constant", STEPS, 0.05) == [1.0] * len(STEPS)  # 0.05 of 10 steps floors to 0 warmup steps


def test_bad_scheduler_name_and_polynomial_with_tiny_lr():
    with pytest.raises(OptionError, match="lr_scheduler.*'cosine_with_min_lr'"):
        _lrs("cosine_with_min_lr", STEPS, 0)
    opt = torch.optim.SGD([_param()], lr=1e-8)
    with pytest.raises(OptionError, match="polynomial"):
        create_lr_scheduler("polynomial", opt, num_training_steps=10)
