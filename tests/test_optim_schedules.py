"""Learning-rate schedules (sd_scripts.training.optim.schedules): each lr_scheduler's curve over a 10-step run equals
its formula written out here, with the lr_* options sd-scripts gives it (warmup and decay as steps or fractions,
num_cycles, power, timescale, min_lr_ratio, lr_scheduler_args, lr_scheduler_type)."""
from __future__ import annotations

import math

import pytest
import torch

from sd_scripts.options import OptionError, parse_args
from sd_scripts.training.optim import create_lr_scheduler, create_optimizer, scheduler_from_args, warmup_steps

T = 10  # steps of the run


def curve(name, optimizer=None, **kw) -> list[float]:
    """The learning rate of steps 0..T (peak 1)."""
    optimizer = optimizer or torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = create_lr_scheduler(name, optimizer, num_training_steps=T, **kw)
    lrs = []
    for _ in range(T + 1):
        lrs.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    return lrs


def warm(s, w):
    return s / max(1, w)


def cos_half(p):  # a half cosine from 1 to 0 over progress p in [0, 1]
    return 0.5 * (1 + math.cos(math.pi * p))


def formula(name, s, w=2, cycles=1, power=2.0, timescale=None, min_ratio=0.1, decay=4):
    p = (s - w) / (T - w)
    if name == "constant":
        return 1.0
    if name == "cosine_warmup_with_min_lr":  # transformers counts this one's steps from 1
        if s < w:
            return (s + 1) / max(1, w)
        return min_ratio + (1 - min_ratio) * cos_half((s - w + 1) / (T - w))
    if name == "warmup_stable_decay" and s < w:  # its warmup rises from the floor
        return min_ratio + (1 - min_ratio) * warm(s, w)
    if s < w:
        return warm(s, w)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (T - s) / (T - w))
    if name == "cosine":
        return cos_half(p)
    if name == "cosine_with_restarts":
        return 0.0 if p >= 1 else cos_half((cycles * p) % 1.0)
    if name == "polynomial":
        return (1 - p) ** power * (1 - 1e-7) + 1e-7
    if name == "inverse_sqrt":
        timescale = timescale or w
        return 1 / math.sqrt((s + timescale - w) / timescale)
    if name == "cosine_with_min_lr":  # num_cycles 1 -> a half cosine
        return min_ratio + (1 - min_ratio) * cos_half(p)
    if name == "warmup_stable_decay":
        stable = T - w - decay
        if s < w + stable:
            return 1.0
        return min_ratio + (1 - min_ratio) * cos_half((s - w - stable) / decay)
    raise AssertionError(name)


@pytest.mark.parametrize("name, kw", [
    ("constant", {"num_warmup_steps": 0}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 5}),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 4, "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 0.4, "min_lr_ratio": 0.1}),  # a fraction of the run
])
@pytest.mark.parametrize("warmup", [2, 0.2, 0.25])  # all mean 2 warmup steps of 10 (floored)
def test_schedule_curve_equals_its_formula(name, kw, warmup):
    kw = {"num_warmup_steps": warmup, **kw}
    w = warmup_steps(kw["num_warmup_steps"], T)
    expected = [formula(name, s, w=w, cycles=kw.get("num_cycles", 1), power=kw.get("power", 1.0),
                        timescale=kw.get("timescale"), min_ratio=kw.get("min_lr_ratio", 0.1),
                        decay=warmup_steps(kw.get("num_decay_steps", 0), T)) for s in range(T + 1)]
    assert curve(name, **kw) == pytest.approx(expected, abs=1e-6)


def test_piecewise_constant_takes_step_rules_from_lr_scheduler_args():
    assert curve("piecewise_constant", scheduler_args=['step_rules="1:3,0.1:6,0.01"']) == pytest.approx(
        [1.0] * 3 + [0.1] * 3 + [0.01] * 5)


def test_lr_scheduler_type_builds_any_scheduler_class_with_its_args():
    assert curve("constant", scheduler_type="CosineAnnealingLR", scheduler_args=["T_max=10", "eta_min=0.0"]) == \
        pytest.approx([cos_half(s / T) for s in range(T + 1)], abs=1e-6)
    assert curve("linear", scheduler_type="torch.optim.lr_scheduler.StepLR", scheduler_args=["step_size=4",
                                                                                            "gamma=0.5"]) == \
        pytest.approx([0.5 ** (s // 4) for s in range(T + 1)])
    with pytest.raises(OptionError, match="lr_warmup_steps.*lr_scheduler_type"):
        curve("constant", scheduler_type="StepLR", scheduler_args=["step_size=4"], num_warmup_steps=2)
    with pytest.raises(OptionError, match="lr_scheduler_type.*T_max"):
        curve("constant", scheduler_type="CosineAnnealingLR")  # its required argument missing


def test_adafactor_schedule_reports_adafactors_own_step_size():
    """Adafactor with relative_step: lr = min(1e-2, 1/sqrt(step)) x max(1e-3, RMS(parameter)); the schedule (the only
    one it takes, whatever lr_scheduler says) reports it, and learning_rate before the first step."""
    from accelerate import Accelerator

    p = torch.nn.Parameter(torch.full((4, 4), 0.5))
    opt = Accelerator(cpu=True).prepare(create_optimizer("Adafactor", None, [p], 1e-4))  # as the trainer holds it
    sched = create_lr_scheduler("cosine", opt, num_training_steps=T, initial_lr=1e-4)
    assert type(sched).__name__ == "AdafactorSchedule"
    assert sched.get_last_lr() == [pytest.approx(1e-4)]
    seen = []
    for step in range(1, 4):
        rms = float(p.detach().pow(2).mean().sqrt())
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        seen.append((sched.get_last_lr()[0], min(1e-2, 1 / math.sqrt(step)) * max(1e-3, rms)))
    for reported, expected in seen:
        assert reported == pytest.approx(expected, rel=1e-6)
    with pytest.raises(OptionError, match="adafactor.*Adafactor"):
        curve("adafactor")
    with pytest.raises(OptionError, match="lr_warmup_steps"):
        create_lr_scheduler("adafactor", opt, num_training_steps=T, num_warmup_steps=2)


def test_schedule_free_optimizer_keeps_its_learning_rate():
    opt = create_optimizer("AdamWScheduleFree", None, [torch.nn.Parameter(torch.ones(3))], 0.5)
    assert curve("cosine", opt, num_warmup_steps=2) == [0.5] * (T + 1)


@pytest.mark.parametrize("name, kw, words", [
    ("constant", {"num_warmup_steps": 2}, ["lr_warmup_steps", "constant_with_warmup"]),
    ("reduce_lr_on_plateau", {}, ["lr_scheduler", "metric"]),
    ("cosine_with_min_lr", {}, ["lr_scheduler_min_lr_ratio"]),
    ("no_such_schedule", {}, ["lr_scheduler", "'no_such_schedule'"]),
    ("constant", {"scheduler_args": ["T_max"]}, ["lr_scheduler_args", "key=value"]),
    ("warmup_stable_decay", {"num_warmup_steps": 6, "num_decay_steps": 0.5}, ["lr_decay_steps", "6 + 5"]),
])
def test_schedule_errors_name_the_option(name, kw, words):
    with pytest.raises(OptionError) as err:
        curve(name, **kw)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert curve("constant", num_warmup_steps=0.05) == [1.0] * (T + 1)  # 0.05 of 10 steps floors to no warmup
    tiny = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-8)
    with pytest.raises(OptionError, match="polynomial"):  # at or below polynomial's 1e-7 end
        create_lr_scheduler("polynomial", tiny, num_training_steps=T)


def test_the_options_reach_the_schedule():
    """Command-line options -> scheduler_from_args, as the trainer calls it ('N%' warmup as sd-scripts reads it)."""
    args = parse_args("network", ["--learning_rate", "1.0", "--lr_scheduler", "warmup_stable_decay",
                                  "--lr_warmup_steps", "20%", "--lr_decay_steps", "0.4",
                                  "--lr_scheduler_min_lr_ratio", "0.1"])
    assert args.lr_warmup_steps == 0.2 and args.lr_decay_steps == 0.4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = scheduler_from_args(args, opt, T)
    lrs = []
    for _ in range(T + 1):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([formula("warmup_stable_decay", s, w=2, decay=4) for s in range(T + 1)], abs=1e-6)
