"""Optimizers (sd_scripts.training.optim): every optimizer_type sd-scripts names, plus torch.optim / module.Class
names, steps exactly as its own library computes for the same inputs, and its state saved mid-run and loaded into a
fresh optimizer continues exactly; the options around them (optimizer_args, use_8bit_adam, use_lion_optimizer,
Adafactor's relative_step, schedule-free train/eval, fused_backward_pass) do what sd-scripts makes them do; an
optimizer whose library cannot work is a one-line error before the model loads."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from sd_scripts.options import OptionError, parse_args
from sd_scripts.training.optim import (bitsandbytes_problem, create_optimizer, eval_weights, is_schedule_free,
                                       parse_optimizer_args, resolve_optimizer_type, set_train_mode)
from sd_scripts.training.optim.registry import OPTIMIZER_NAMES


def _bnb(name):
    return lambda ps, lr: getattr(__import__("bitsandbytes").optim, name)(ps, lr=lr)


def _cls(module, name):
    return lambda ps, lr: getattr(__import__(module, fromlist=[name]), name)(ps, lr=lr)


# What each name means, written from sd-scripts' get_optimizer (not from our table): the library's class, built the
# way sd-scripts builds it, with the learning rate the test uses.
REFERENCE = {
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
    "SGDNesterov": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "AdamW8bit": _bnb("AdamW8bit"),
    "SGDNesterov8bit": lambda ps, lr: __import__("bitsandbytes").optim.SGD8bit(ps, lr=lr, momentum=0.9,
                                                                               nesterov=True),
    "Lion8bit": _bnb("Lion8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "Lion": _cls("lion_pytorch", "Lion"),
    "DAdaptation": _cls("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdaGrad": _cls("dadaptation", "DAdaptAdaGrad"),
    "DAdaptAdam": _cls("dadaptation", "DAdaptAdam"),
    "DAdaptAdan": _cls("dadaptation", "DAdaptAdan"),
    "DAdaptAdanIP": _cls("dadaptation.experimental", "DAdaptAdanIP"),
    "DAdaptLion": _cls("dadaptation", "DAdaptLion"),
    "DAdaptSGD": _cls("dadaptation", "DAdaptSGD"),
    "Prodigy": _cls("prodigyopt", "Prodigy"),
    "Adafactor": lambda ps, lr: __import__("transformers").optimization.Adafactor(ps, lr=None, relative_step=True),
    "RAdamScheduleFree": _cls("schedulefree", "RAdamScheduleFree"),
    "AdamWScheduleFree": _cls("schedulefree", "AdamWScheduleFree"),
    "SGDScheduleFree": _cls("schedulefree", "SGDScheduleFree"),
    # any torch.optim class, or module.Class
    "Adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "pytorch_optimizer.CAME": _cls("pytorch_optimizer", "CAME"),
    "prodigyplus.ProdigyPlusScheduleFree": _cls("prodigyplus", "ProdigyPlusScheduleFree"),
}
ADAPTIVE = {"DAdaptation", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD",
            "Prodigy", "prodigyplus.ProdigyPlusScheduleFree"}


def test_every_sd_scripts_name_is_known_and_tested():
    assert set(OPTIMIZER_NAMES) <= set(REFERENCE)
    assert {"AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
            "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdam", "DAdaptAdaGrad",
            "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "Adafactor", "RAdamScheduleFree",
            "AdamWScheduleFree", "SGDScheduleFree"} <= set(OPTIMIZER_NAMES)


def _params(seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # 64 x 64 = 4096 elements: large enough for bitsandbytes to keep 8-bit state
    return [torch.nn.Parameter(torch.randn(64, 64, generator=g) * 0.1), torch.nn.Parameter(torch.randn(64, generator=g))]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(64, 64, generator=g), torch.randn(64, generator=g)]


def _step(optimizer, params, step):
    for p, grad in zip(params, _grads(step)):
        p.grad = grad.clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _assert_same(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x.detach(), y.detach())
        else:
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_steps_like_its_library_and_resumes_exactly(name):
    lr = 1.0 if name in ADAPTIVE else 1e-2
    ours_params, ref_params = _params(), _params()
    ours = create_optimizer(name, None, [{"params": ours_params, "lr": lr}], lr, warn=lambda m: None)
    reference = REFERENCE[name]([{"params": ref_params, "lr": lr}], lr)
    if hasattr(reference, "train"):
        reference.train()
    start = [p.detach().clone() for p in ours_params]
    for step in range(3):
        _step(ours, ours_params, step)
        _step(reference, ref_params, step)
    # AdamW: ours takes torch's fused CPU kernel, the reference its per-tensor loop (same maths, last-bit rounding)
    _assert_same(ours_params, ref_params, exact=name != "AdamW")

    # save_state mid-run (a schedule-free optimizer in eval mode, with its averaged weights, as the loop saves it)
    # and continue in a fresh optimizer: the same weights as the run that never stopped
    buffer = io.BytesIO()
    with eval_weights(ours):
        saved_weights = [p.detach().clone() for p in ours_params]
        torch.save(ours.state_dict(), buffer)
    resumed_params = [torch.nn.Parameter(w) for w in saved_weights]
    resumed = create_optimizer(name, None, [{"params": resumed_params, "lr": lr}], lr, warn=lambda m: None)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    set_train_mode(resumed)
    for step in range(3, 6):  # RAdam's rectification holds the first four steps back
        _step(ours, ours_params, step)
        _step(resumed, resumed_params, step)
    _assert_same(ours_params, resumed_params)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, ours_params)), "the optimizer moved nothing"


def test_schedule_free_weights_switch_for_sampling_and_saving():
    params = _params()
    opt = create_optimizer("AdamWScheduleFree", ["warmup_steps=0"], [{"params": params, "lr": 0.1}], 0.1)
    assert is_schedule_free(opt) and all(g["train_mode"] for g in opt.param_groups), "created in train mode"
    for step in range(3):
        _step(opt, params, step)
    train_weights = params[0].detach().clone()
    with eval_weights(opt):
        assert not any(g["train_mode"] for g in opt.param_groups)
        eval_weights_seen = params[0].detach().clone()
        with eval_weights(opt):  # nested (a save inside a sample request) changes nothing
            assert torch.equal(params[0], eval_weights_seen)
        # the eval point x is the average the optimizer keeps: y = (1 - beta1) * z + beta1 * x
        z = opt.state[params[0]]["z"]
        beta1 = opt.param_groups[0]["betas"][0]
        torch.testing.assert_close(train_weights, (1 - beta1) * z + beta1 * eval_weights_seen, rtol=1e-5, atol=1e-6)
    assert not torch.equal(train_weights, eval_weights_seen)
    torch.testing.assert_close(params[0].detach(), train_weights, rtol=1e-6, atol=1e-7)
    assert all(g["train_mode"] for g in opt.param_groups)


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


def test_optimizer_args_reach_the_optimizer_on_hand_numbers():
    p = _param(1.0)
    opt = create_optimizer("AdamW", ["weight_decay=0.5", "betas=0.9,0.99"], [p], 0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0.5
    p.grad = torch.tensor([2.0])
    opt.step()
    # first Adam step moves by lr * sign(grad); decoupled decay first: 1 * (1 - 0.1 * 0.5) - 0.1 = 0.85
    assert p.item() == pytest.approx(0.85, abs=1e-6)
    # SGDNesterov: momentum 0.9 unless given; nesterov always
    q = _param(1.0)
    sgd = create_optimizer("sgdnesterov", ["momentum=0.5"], [q], 0.1)
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.5
    q.grad = torch.tensor([2.0])
    sgd.step()
    assert q.item() == pytest.approx(1 - 0.1 * (2.0 + 0.5 * 2.0), abs=1e-6)  # nesterov: g + m * buf, buf = g
    with pytest.raises(OptionError, match="nesterov"):
        create_optimizer("SGDNesterov", ["nesterov=False"], [_param()], 0.1)


def test_param_groups_keep_their_own_lr_and_name_is_case_insensitive():
    a, b = _param(), _param()
    opt = create_optimizer("adamw", None, [{"params": [a], "lr": 0.5}, {"params": [b]}], 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]
    assert opt.defaults["weight_decay"] == 0.01  # torch's (and sd-scripts') default


@pytest.mark.parametrize("name, args, words", [
    ("AdamW", ["momentum=0.9"], ["optimizer_args", "'momentum'", "weight_decay"]),
    ("AdamW", ["lr=0.1"], ["learning_rate"]),
    ("AdamW", ["betas=1.5,0.9"], ["optimizer_args", "beta"]),
    ("NoSuchOptim", None, ["optimizer_type", "torch.optim", "NoSuchOptim"]),
    ("not_a_package.Opt", None, ["optimizer_type", "not_a_package", "pip install"]),
])
def test_bad_optimizer_settings_name_the_problem(name, args, words):
    with pytest.raises(OptionError) as err:
        create_optimizer(name, args, [_param()], 1e-3)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_adafactor_relative_step_as_sd_scripts():
    """relative_step on by default: Adafactor's own step size, group learning rates dropped (warned), and the
    adafactor schedule; warmup_init turns relative_step on; relative_step=False uses the learning rates."""
    from transformers.optimization import Adafactor

    warnings: list[str] = []
    a, b = _params(), _params()
    opt = create_optimizer("Adafactor", None, [{"params": a[:1], "lr": 1e-4}, {"params": a[1:], "lr": 5e-5}], 1e-4,
                           warn=warnings.append)
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert all("lr" not in g or g["lr"] is None for g in opt.param_groups)
    assert any("unet_lr / text_encoder_lr are ignored" in w for w in warnings)
    reference = Adafactor([{"params": b[:1]}, {"params": b[1:]}], lr=None)
    for step in range(2):
        _step(opt, a, step)
        _step(reference, b, step)
    _assert_same(a, b)
    opt = create_optimizer("Adafactor", ["relative_step=False", "warmup_init=True"], _params(), 1e-3)
    assert opt.defaults["relative_step"] is True
    fixed = create_optimizer("Adafactor", ["relative_step=False", "scale_parameter=False"],
                             [{"params": [_param()], "lr": 0.25}], 1e-3)
    assert fixed.defaults["relative_step"] is False and fixed.param_groups[0]["lr"] == 0.25


def test_adaptive_optimizers_warn_about_small_or_several_learning_rates():
    warnings: list[str] = []
    create_optimizer("Prodigy", None, [{"params": [_param()], "lr": 1e-4}, {"params": [_param()], "lr": 1e-5}],
                     1e-4, warn=warnings.append)
    assert any("about 1.0" in w for w in warnings) and any("differ" in w for w in warnings)


def test_older_flags_choose_the_optimizer():
    assert resolve_optimizer_type("AdamW", use_8bit_adam=True) == "AdamW8bit"
    assert resolve_optimizer_type("", use_lion_optimizer=True) == "Lion"
    assert resolve_optimizer_type(None) == "AdamW"
    with pytest.raises(OptionError, match="use_8bit_adam.*use_lion_optimizer"):
        resolve_optimizer_type("", use_8bit_adam=True, use_lion_optimizer=True)
    with pytest.raises(OptionError, match="use_lion_optimizer.*Prodigy"):
        resolve_optimizer_type("Prodigy", use_lion_optimizer=True)


def test_bitsandbytes_on_this_machine():
    """bitsandbytes 0.50 runs its 8-bit and paged optimizers on the CPU (paged = plain there)."""
    for name in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit", "SGD8bit"):
        assert bitsandbytes_problem("cpu", name) is None, name
    assert "no NoSuch8bit" in bitsandbytes_problem("cpu", "NoSuch8bit")


def test_fused_backward_with_adafactor_steps_like_adafactor():
    """sd-scripts' fused_backward_pass optimizer: stepping each parameter inside backward gives Adafactor's weights."""
    from sd_scripts.training.fused_backward import FusedBackwardOptimizer

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    fused = copy.deepcopy(plain)
    opt_plain = create_optimizer("Adafactor", None, plain.parameters(), 1e-3)
    opt_fused = FusedBackwardOptimizer(create_optimizer("Adafactor", None, fused.parameters(), 1e-3))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(fused(x), y).backward()
        opt_fused.step()
    _assert_same(list(plain.parameters()), list(fused.parameters()), exact=False)
    assert not torch.equal(plain[0].weight, torch.nn.Sequential(torch.nn.Linear(6, 8))[0].weight)


# ---------------------------------------------------------------- before the model loads
def _trainer_args(model, out, *options):
    return parse_args("network", ["--pretrained_model_name_or_path", model, "--output_dir", str(out),
                                  "--train_data_dir", str(out), *options])


@pytest.mark.parametrize("options, words", [
    (["--optimizer_type", "PagedAdamW8bit"], ["PagedAdamW8bit", "bitsandbytes", "cannot run", "AdamW"]),
    (["--optimizer_type", "not_a_package.Opt"], ["optimizer_type", "pip install not_a_package"]),
    (["--optimizer_type", "AdamW", "--optimizer_args", "momentum=0.9"], ["optimizer_args", "momentum"]),
    (["--lr_scheduler", "reduce_lr_on_plateau"], ["lr_scheduler", "metric"]),
    (["--lr_scheduler", "cosine_with_min_lr"], ["lr_scheduler_min_lr_ratio"]),
    (["--lr_scheduler_type", "NoSuchLR"], ["lr_scheduler_type", "NoSuchLR"]),
    (["--use_8bit_adam", "--use_lion_optimizer"], ["use_8bit_adam", "use_lion_optimizer"]),
    (["--optimizer_type", "Adafactor", "--lr_warmup_steps", "10"], ["lr_warmup_steps", "adafactor", "warmup_init"]),
    (["--lr_scheduler", "adafactor"], ["lr_scheduler", "Adafactor"]),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], ["lr_warmup_steps", "constant_with_warmup"]),
])
def test_an_optimizer_that_cannot_work_stops_the_run_before_the_model_loads(tiny_sd1, tmp_path, monkeypatch,
                                                                          options, words):
    from sd_scripts.models import loading
    from sd_scripts.training import optim
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    # a machine where bitsandbytes' kernels do not run (bitsandbytes 0.50 runs them on this CPU)
    monkeypatch.setattr(optim.optimizers, "bitsandbytes_problem",
                        lambda device, name: f"no {name} kernel for {device}")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = _trainer_args(tiny_sd1.diffusers_dir, tmp_path, *options)
    with pytest.raises(OptionError) as err:
        Trainer(args, NetworkMethod(args)).run()
    assert all(w in str(err.value) for w in words), str(err.value)


def test_schedule_free_optimizers_ignore_the_schedule_options_as_sd_scripts():
    from sd_scripts.training.optim import check_optimizer_options

    check_optimizer_options(parse_args("network", ["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler",
                                                   "reduce_lr_on_plateau", "--lr_warmup_steps", "10"]))


def test_fused_backward_pass_refuses_optimizers_that_do_not_step_parameters_alone():
    from sd_scripts.training.optim import check_optimizer_options

    args = parse_args("db", ["--fused_backward_pass", "--optimizer_type", "Prodigy", "--learning_rate", "1"])
    with pytest.raises(OptionError, match="fused_backward_pass.*Prodigy.*Adafactor"):
        check_optimizer_options(args)
    check_optimizer_options(parse_args("db", ["--fused_backward_pass", "--optimizer_type", "Adafactor"]))
