"""Tests for sd_scripts.training.loss on hand-computed numbers: the loss types, the Huber threshold schedules, the loss
mask with a loss type, and the option errors of LossSettings. (The options reaching the step: test_loss_noise.py.)"""
import math
from types import SimpleNamespace

import pytest
import torch

from sd_scripts.options import OptionError
from sd_scripts.training.loss import LossSettings, elementwise_loss, huber_thresholds, training_loss


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


D = torch.tensor([0.0, 0.5, -2.0]).reshape(1, 3, 1, 1)  # pred - target of one sample


def test_loss_types_on_hand_numbers():
    zero = torch.zeros_like(D)
    close(elementwise_loss(D, zero, "l2").flatten(), [0.0, 0.25, 4.0])
    close(elementwise_loss(D, zero, "l1").flatten(), [0.0, 0.5, 2.0])
    # pseudo-Huber, c = 1: 2 (sqrt(d^2 + 1) - 1)
    close(elementwise_loss(D, zero, "huber", torch.tensor([1.0])).flatten(),
          [0.0, 2 * (math.sqrt(1.25) - 1), 2 * (math.sqrt(5) - 1)])
    # c = 0.5: huber 2 c (sqrt(d^2 + c^2) - c), smooth_l1 the same without the factor c
    smooth = [0.0, 2 * (math.sqrt(0.5) - 0.5), 2 * (math.sqrt(4.25) - 0.5)]
    close(elementwise_loss(D, zero, "smooth_l1", torch.tensor([0.5])).flatten(), smooth)
    close(elementwise_loss(D, zero, "huber", torch.tensor([0.5])).flatten(), [0.5 * v for v in smooth])
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(D, zero, "huber")


def test_huber_thresholds_on_hand_numbers():
    t = torch.tensor([0, 500, 1000])
    close(huber_thresholds("constant", t, 0.1, 2.0), [0.2] * 3)
    close(huber_thresholds("exponential", t, 0.1, 2.0), [2.0, 2.0 * math.sqrt(0.1), 0.2])  # scale down to c * scale
    a = torch.tensor([0.64, 0.2])  # sigma = sqrt((1 - a) / a) = 0.75 and 2; huber_scale is not used
    close(huber_thresholds("snr", torch.tensor([0, 1]), 0.1, 2.0, alphas_cumprod=a),
          [0.9 / 1.75 ** 2 + 0.1, 0.9 / 9 + 0.1])
    with pytest.raises(ValueError, match="DDPM"):
        huber_thresholds("snr", t, 0.1)


def test_mask_weighs_each_elements_loss_of_any_type():
    pred = torch.tensor([[[[1.0, -3.0]]], [[[2.0, 2.0]]]])  # [2, 1, 1, 2]
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])  # [2, 1, 2]
    # l1 per element [1, 3] and [2, 2], masked [1, 0] and [1, 1]: per-sample means 0.5 and 1, weights 2 and 1
    close(training_loss(pred, target, torch.tensor([2.0, 1.0]), mask=mask, loss_type="l1"), 1.0)
    close(training_loss(pred, target, loss_type="l1"), 2.0)


def test_settings_from_options_and_their_errors():
    assert LossSettings.from_args(None) == LossSettings("l2", "snr", 0.1, 1.0)
    args = SimpleNamespace(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2, huber_scale=3.0)
    settings = LossSettings.from_args(args, has_ddpm_schedule=False)
    close(settings.thresholds(torch.tensor([0, 1000])), [3.0, 0.6])
    assert LossSettings.from_args(SimpleNamespace(loss_type="l1")).thresholds(torch.tensor([3])) is None
    with pytest.raises(OptionError, match="'huber_schedule'.*constant or exponential"):
        LossSettings.from_args(SimpleNamespace(loss_type="huber"), has_ddpm_schedule=False)
    LossSettings.from_args(SimpleNamespace(loss_type="l2"), has_ddpm_schedule=False)  # snr is unused with l2
    with pytest.raises(OptionError, match="'huber_c'"):
        LossSettings.from_args(SimpleNamespace(loss_type="huber", huber_schedule="exponential", huber_c=0.0))
