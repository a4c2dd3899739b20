"""Tests for sd_scripts.training.noise on hand-computed numbers.

The made-up schedule alphas_cumprod = [0.64, 0.36, 0.5, 0.2] has simple roots: sqrt(0.64) = 0.8, sqrt(0.36) = 0.6,
and SNR = a / (1 - a) = [16/9, 9/16, 1, 1/4].
"""
import pytest
import torch

from sd_scripts.training.noise import (add_noise, compute_snr, diffusion_loss, make_noise, min_snr_weight,
                                       per_sample_mse, sample_timesteps, training_target)

A = torch.tensor([0.64, 0.36, 0.5, 0.2])
T01 = torch.tensor([0, 1])


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


def test_add_noise_on_hand_numbers():
    x = torch.ones(2, 1, 2, 2)
    n = torch.full((2, 1, 2, 2), 2.0)
    noisy = add_noise(A, x, n, T01)
    close(noisy[0], torch.full((1, 2, 2), 0.8 * 1 + 0.6 * 2))  # 2.0
    close(noisy[1], torch.full((1, 2, 2), 0.6 * 1 + 0.8 * 2))  # 2.2
    assert noisy.dtype == x.dtype


def test_add_noise_keeps_half_precision_dtype():
    x = torch.ones(1, 4, 2, 2, dtype=torch.bfloat16)
    noisy = add_noise(A, x, torch.zeros_like(x), torch.tensor([0]))
    assert noisy.dtype == torch.bfloat16
    torch.testing.assert_close(noisy.float(), torch.full((1, 4, 2, 2), 0.8), atol=4e-3, rtol=0)


def test_training_targets():
    x = torch.ones(2, 1, 1, 1)
    n = torch.full((2, 1, 1, 1), 2.0)
    assert training_target("epsilon", x, n, T01, A) is n
    v = training_target("v_prediction", x, n, T01, A)
    close(v.flatten(), [0.8 * 2 - 0.6 * 1, 0.6 * 2 - 0.8 * 1])  # [1.0, 0.4]
    with pytest.raises(ValueError, match="prediction_type"):
        training_target("sample", x, n, T01, A)


def test_snr_and_min_snr_weights():
    t = torch.tensor([0, 1, 2, 3])
    snr = compute_snr(A, t)
    close(snr, [16 / 9, 9 / 16, 1.0, 0.25])
    # epsilon: min(snr, gamma) / snr
    close(min_snr_weight(snr, 1.0), [9 / 16, 1.0, 1.0, 1.0])
    close(min_snr_weight(snr, 5.0), [1.0, 1.0, 1.0, 1.0])
    # v: min(snr, gamma) / (snr + 1); with gamma 1 this is 1 - a for snr >= 1 and a for snr < 1
    close(min_snr_weight(snr, 1.0, v_prediction=True), [0.36, 0.36, 0.5, 0.2])
    close(min_snr_weight(snr, 5.0, v_prediction=True), [0.64, 0.36, 0.5, 0.2])


def test_per_sample_mse_and_diffusion_loss():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    close(per_sample_mse(pred, target), [1.0, 4.0])
    close(diffusion_loss(pred, target, T01, A), 2.5)
    close(diffusion_loss(pred, target, T01, A, loss_weights=torch.tensor([1.0, 0.5])), 1.5)
    # min-SNR gamma 1, epsilon: weights [9/16, 1] -> (0.5625 + 4) / 2
    close(diffusion_loss(pred, target, T01, A, min_snr_gamma=1.0), 2.28125)
    # v: weights [0.36, 0.36] -> (0.36 + 1.44) / 2
    close(diffusion_loss(pred, target, T01, A, min_snr_gamma=1.0, v_prediction=True), 0.9)
    # all together: ([1, 4] * [2, 1] * [9/16, 1]).mean() = (1.125 + 4) / 2
    close(diffusion_loss(pred, target, T01, A, min_snr_gamma=1.0, loss_weights=torch.tensor([2.0, 1.0])), 2.5625)
    loss = diffusion_loss(pred.half(), target.half(), T01, A)
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_sample_timesteps_range_determinism_and_errors():
    t = sample_timesteps(4096, 1000)
    assert t.dtype == torch.long and t.shape == (4096,)
    assert int(t.min()) >= 0 and int(t.max()) <= 999 and int(t.max()) > 900
    t = sample_timesteps(2000, 1000, min_timestep=100, max_timestep=200)
    assert int(t.min()) >= 100 and int(t.max()) <= 199
    assert sample_timesteps(5, 1000, min_timestep=7, max_timestep=8).tolist() == [7] * 5
    a = sample_timesteps(8, generator=torch.Generator().manual_seed(1), device="cpu")
    b = sample_timesteps(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert sample_timesteps(3, 1000, min_timestep=5, max_timestep=5).tolist() == [5] * 3  # sd-scripts: that one
    for low, high in ((6, 5), (-1, 10), (0, 1001), (1000, 1000)):
        with pytest.raises(ValueError, match="min_timestep"):
            sample_timesteps(2, 1000, min_timestep=low, max_timestep=high)


def test_make_noise_and_offset_noise():
    latents = torch.zeros(2, 4, 8, 8)
    plain = make_noise(latents, None, torch.Generator().manual_seed(0))
    assert plain.shape == latents.shape and plain.dtype == latents.dtype
    assert torch.equal(plain, make_noise(latents, 0.0, torch.Generator().manual_seed(0)))
    offset = make_noise(latents, 0.1, torch.Generator().manual_seed(0))
    diff = offset - plain  # 0.1 * one draw per (sample, channel), constant over the image
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=g)
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    close(diff[:, :, :1, :1], expected)
    assert diff.abs().sum() > 0


def test_snr_loss_weights_on_hand_numbers():
    from sd_scripts.training.noise import debiased_estimation_weight, v_loss_as_epsilon_scale, v_pred_like_weight

    snr = compute_snr(A, torch.arange(4))  # [16/9, 9/16, 1, 1/4]
    close(v_loss_as_epsilon_scale(snr), [16 / 25, 9 / 25, 0.5, 0.2])
    close(v_pred_like_weight(snr, 0.5), [1 + 0.5 * 25 / 16, 1 + 0.5 * 25 / 9, 2.0, 3.5])
    close(debiased_estimation_weight(snr), [0.75, 4 / 3, 1.0, 2.0])
    close(debiased_estimation_weight(snr, v_prediction=True), [9 / 25, 16 / 25, 0.5, 0.8])
    capped = torch.tensor([float("inf"), 4000.0])  # sd-scripts caps the SNR at 1000 in these weights
    close(debiased_estimation_weight(capped), [1000 ** -0.5] * 2)
    close(v_loss_as_epsilon_scale(capped), [1000 / 1001] * 2)


def test_multires_and_perturbed_noise_draw_from_the_generator():
    from sd_scripts.training.noise import multires_noise, perturbed_noise

    base = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = multires_noise(base, 6, 0.5, torch.Generator().manual_seed(1))
    b = multires_noise(base, 6, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == base.shape and float(a.std()) == pytest.approx(1.0, abs=1e-5)
    assert float((a - base / base.std()).abs().mean()) > 0.1
    assert perturbed_noise(base, None) is base and perturbed_noise(base, 0.0) is base
    g = torch.Generator().manual_seed(2)
    out = perturbed_noise(base, 0.3, generator=g)
    close(out, base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(3)
    out = perturbed_noise(base, 0.3, True, generator=g)
    replay = torch.Generator().manual_seed(3)
    strength = torch.rand((), generator=replay) * 0.3
    close(out, base + strength * torch.randn(base.shape, generator=replay))
