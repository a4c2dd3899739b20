"""Tests for sd_scripts.training.flow_matching on hand-computed numbers and, for the samplers, on statistics of
draws from fixed generators (deterministic: the same seed gives the same draws, so the tolerances never flake).

Shift with 3: s' = 3 s / (1 + 2 s), so 0.5 -> 0.75, 0.25 -> 0.5. FLUX mu at 64 x 64 latents: 32 * 32 = 1024 packed
tokens, mu = 0.5 + 0.65 * (1024 - 256) / 3840 = 0.63.
"""
import math

import pytest
import torch

from sd_scripts.training import flow_matching as fm

N = 20_000  # draws for the statistics


def close(actual, expected, **kw):
    kw.setdefault("rtol", 1e-6)
    kw.setdefault("atol", 1e-6)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- shifts


def test_shift_sigmas_on_hand_numbers():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    close(fm.shift_sigmas(s, 3.0), [0.0, 0.5, 0.75, 1.0])
    close(fm.shift_sigmas(s, 1.0), s)
    close(fm.shift_sigmas(torch.tensor([0.75]), 1 / 3), [0.5])  # shift 1/s undoes shift s


def test_flux_mu_and_sequence_length():
    assert fm.flux_packed_sequence_length(64, 64) == 1024
    assert fm.flux_packed_sequence_length(128, 96) == 64 * 48
    assert fm.flux_packed_sequence_length(9, 9) == 16  # floor: odd latent sizes lose their last row/column
    assert fm.flux_mu(256) == pytest.approx(0.5)
    assert fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.flux_mu(1024) == pytest.approx(0.63)


def test_flux_time_shift_is_the_exponential_shift():
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    close(fm.flux_time_shift(math.log(3.0), t), fm.shift_sigmas(t, 3.0))
    # by hand: e^0.63 / (e^0.63 + 1) at t = 0.5
    close(fm.flux_time_shift(0.63, torch.tensor([0.5])), [math.exp(0.63) / (math.exp(0.63) + 1)])


def test_scheduler_sigmas_match_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        ours = fm.scheduler_sigmas(shift)
        assert ours.dtype == torch.float32 and ours.shape == (1000,)
        assert torch.equal(ours, ref.sigmas[:1000].float())
        assert torch.equal(ours * 1000, ref.timesteps.float())
    close(fm.scheduler_sigmas(1.0)[[0, 500, 999]], [1.0, 0.5, 0.001])


# ---------------------------------------------------------------- density


def test_density_uniform_schemes_are_torch_rand():
    for scheme in ("uniform", "none", "sigma_sqrt", "cosmap"):
        u = fm.sample_density(scheme, 5, generator=gen(1))
        assert torch.equal(u, torch.rand(5, generator=gen(1)))


def test_density_logit_normal_statistics():
    u = fm.sample_density("logit_normal", N, logit_mean=1.0, logit_std=0.5, generator=gen())
    logits = torch.log(u / (1 - u))
    assert abs(logits.mean().item() - 1.0) < 0.02 and abs(logits.std().item() - 0.5) < 0.02
    assert fm.sample_density("logit_normal", 4, generator=gen()).shape == (4,)


def test_density_mode_concentrates_around_the_middle():
    u = fm.sample_density("mode", N, mode_scale=1.29, generator=gen())
    assert abs(u.mean().item() - 0.5) < 0.01  # E[u'] = 1/2 for any scale
    # u' is monotone; u in [0.25, 0.75] maps to [0.5 -+ 1.29 (0.25 - sin^2(pi/8))], probability 0.5
    half_width = 0.25 - 1.29 * (0.25 - math.sin(math.pi / 8) ** 2)
    inside = ((u - 0.5).abs() < half_width).float().mean().item()
    assert abs(inside - 0.5) < 0.015
    flat = fm.sample_density("mode", N, mode_scale=0.0, generator=gen())
    close(flat, 1 - torch.rand(N, generator=gen()))


def test_unknown_choices_are_errors():
    with pytest.raises(ValueError, match="weighting_scheme"):
        fm.sample_density("lognorm", 2)
    with pytest.raises(ValueError, match="timestep_sampling"):
        fm.sample_flux_sigmas("cosine", 2, latent_height=8, latent_width=8)
    with pytest.raises(ValueError, match="model_prediction_type"):
        fm.apply_model_prediction_type("v", torch.zeros(1), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="min_timestep"):
        fm.sample_sd3_sigmas(2, min_timestep=500, max_timestep=100)


# ---------------------------------------------------------------- FLUX sampling


def flux(mode, n=N, seed=0, **kw):
    kw.setdefault("latent_height", 64)
    kw.setdefault("latent_width", 64)
    return fm.sample_flux_sigmas(mode, n, generator=gen(seed), **kw)


def test_flux_uniform_and_sigmoid_use_the_generator_draws():
    sig, t = flux("uniform", 6)
    assert torch.equal(sig, torch.rand(6, generator=gen()))
    close(t, sig * 1000)
    sig, _ = flux("sigmoid", 6, sigmoid_scale=2.0)
    assert torch.equal(sig, torch.sigmoid(2.0 * torch.randn(6, generator=gen())))
    sig, _ = flux("shift", 6, sigmoid_scale=1.0, discrete_flow_shift=3.0)
    s = torch.sigmoid(torch.randn(6, generator=gen()))
    close(sig, 3 * s / (1 + 2 * s))


def test_flux_sampling_statistics():
    # medians move through the monotone maps: sigmoid(N(0,1)) has median 0.5
    for mode, kw, median in (("uniform", {}, 0.5), ("sigmoid", {}, 0.5),
                             ("shift", {"discrete_flow_shift": 3.0}, 0.75),
                             ("shift", {"discrete_flow_shift": 1.0}, 0.5),
                             ("flux_shift", {}, math.exp(0.63) / (math.exp(0.63) + 1)),
                             ("flux_shift", {"latent_height": 128, "latent_width": 128},
                              math.exp(1.15) / (math.exp(1.15) + 1)),
                             ("sigma", {"discrete_flow_shift": 3.0}, 0.75),
                             ("sigma", {"discrete_flow_shift": 1.0}, 0.5)):
        sig, t = flux(mode, **kw)
        assert sig.shape == t.shape == (N,) and sig.dtype == torch.float32, mode
        assert 0.0 <= sig.min().item() and sig.max().item() <= 1.0, mode
        assert abs(sig.median().item() - median) < 0.01, (mode, kw)
    # a larger sigmoid_scale spreads the sigmoid sample towards 0 and 1
    narrow, _ = flux("sigmoid", sigmoid_scale=1.0)
    wide, _ = flux("sigmoid", sigmoid_scale=4.0)
    assert wide.std() > narrow.std() + 0.1


def test_flux_sigma_mode_takes_the_scheduler_values():
    sig, t = flux("sigma", 1000, discrete_flow_shift=3.0)
    table = fm.scheduler_sigmas(3.0)
    u = torch.rand(1000, generator=gen())
    assert torch.equal(sig, table[(u * 1000).long()])
    assert torch.equal(t, sig * 1000)
    # weighting_scheme shapes the index: logit_normal centres it
    ln, _ = flux("sigma", discrete_flow_shift=1.0, weighting_scheme="logit_normal", logit_std=0.3)
    assert ln.std() < 0.1 and abs(ln.median().item() - 0.5) < 0.01


def test_flux_sampling_is_deterministic_and_moves_to_device():
    a, _ = flux("flux_shift", 8, seed=3)
    b, _ = flux("flux_shift", 8, seed=3)
    c, _ = flux("flux_shift", 8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    sig, t = fm.sample_flux_sigmas("sigmoid", 3, latent_height=8, latent_width=8, device="cpu")
    assert sig.device.type == "cpu" and t.shape == (3,)


# ---------------------------------------------------------------- SD3 sampling


def test_sd3_timesteps_are_integers_over_a_thousand():
    sig, t = fm.sample_sd3_sigmas(8, generator=gen())
    expected = (torch.rand(8, generator=gen()) * 1000).long().float()
    assert torch.equal(t, expected)
    close(sig, expected / 1000)
    assert t.dtype == torch.float32


def test_sd3_min_max_timestep_and_shift():
    sig, t = fm.sample_sd3_sigmas(N, min_timestep=200, max_timestep=300, generator=gen())
    assert t.min().item() >= 200 and t.max().item() <= 299
    assert torch.equal(t, t.round())
    sig, _ = fm.sample_sd3_sigmas(N, training_shift=3.0, generator=gen())
    assert abs(sig.median().item() - 0.75) < 0.01
    sig, _ = fm.sample_sd3_sigmas(N, weighting_scheme="logit_normal", logit_mean=-1.0, generator=gen())
    assert abs(sig.median().item() - 1 / (1 + math.e)) < 0.01  # sigmoid(-1), floored to 1/1000


def test_sd3_timestep_dtype_reproduces_the_weight_dtype_rounding():
    # a seed whose first draw gives t = 999
    seed = next(s for s in range(10_000) if int(torch.rand(1, generator=gen(s)).item() * 1000) == 999)
    sig, t = fm.sample_sd3_sigmas(1, generator=gen(seed))
    assert t.item() == 999 and sig.item() == pytest.approx(0.999)
    sig, t = fm.sample_sd3_sigmas(1, timestep_dtype=torch.bfloat16, generator=gen(seed))
    assert t.dtype == torch.bfloat16 and t.item() == 1000 and sig.item() == 1.0


# ---------------------------------------------------------------- noisy input, targets, predictions, loss


def test_add_flow_noise_on_hand_numbers():
    x = torch.ones(2, 1, 2, 2)
    n = torch.full((2, 1, 2, 2), 3.0)
    noisy = fm.add_flow_noise(x, n, torch.tensor([0.25, 1.0]))
    close(noisy[0], torch.full((1, 2, 2), 0.75 * 1 + 0.25 * 3))  # 1.5
    close(noisy[1], torch.full((1, 2, 2), 3.0))
    assert noisy.dtype == torch.float32
    half = fm.add_flow_noise(x.bfloat16(), n.bfloat16(), torch.tensor([0.25, 0.0]))
    assert half.dtype == torch.bfloat16 and half.shape == x.shape
    close(half.float()[1], torch.ones(1, 2, 2))
    seq = fm.add_flow_noise(torch.ones(2, 5, 16), torch.zeros(2, 5, 16), torch.tensor([0.5, 0.1]))  # packed [B, L, C]
    close(seq[:, 0, 0], [0.5, 0.9])


def test_targets_and_preconditioning():
    x = torch.ones(1, 1, 1, 1)
    n = torch.full((1, 1, 1, 1), 3.0)
    close(fm.flux_target(x, n), torch.full((1, 1, 1, 1), 2.0))
    assert fm.sd3_target(x) is x
    sig = torch.tensor([0.25])
    noisy = fm.add_flow_noise(x, n, sig)  # 1.5
    close(fm.precondition_prediction(torch.full_like(x, 2.0), noisy, sig), torch.ones_like(x))  # -0.5 + 1.5
    # the exact velocity n - x0, preconditioned, gives back x0 at every sigma
    x = torch.randn(4, 2, 3, 3, generator=gen())
    n = torch.randn(4, 2, 3, 3, generator=gen(1))
    sig = torch.tensor([0.0, 0.3, 0.7, 1.0])
    close(fm.precondition_prediction(fm.flux_target(x, n), fm.add_flow_noise(x, n, sig), sig), x, atol=1e-5,
          rtol=0)


def test_loss_weighting_on_hand_numbers():
    s = torch.tensor([0.5, 0.25, 1.0])
    close(fm.loss_weighting("sigma_sqrt", s), [4.0, 16.0, 1.0])
    close(fm.loss_weighting("cosmap", torch.tensor([0.5, 0.0, 1.0])), [4 / math.pi, 2 / math.pi, 2 / math.pi])
    for scheme in ("logit_normal", "mode", "none", "uniform"):
        close(fm.loss_weighting(scheme, s), [1.0, 1.0, 1.0])


def test_model_prediction_types():
    pred = torch.full((2, 1, 1, 1), 2.0)
    noisy = torch.full((2, 1, 1, 1), 1.5)
    sig = torch.tensor([0.25, 0.5])
    out, w = fm.apply_model_prediction_type("raw", pred, noisy, sig)
    assert out is pred and w is None
    out, w = fm.apply_model_prediction_type("additive", pred, noisy, sig)
    close(out.flatten(), [3.5, 3.5])
    assert w is None
    out, w = fm.apply_model_prediction_type("sigma_scaled", pred, noisy, sig, "sigma_sqrt")
    close(out.flatten(), [1.0, 0.5])
    close(w, [16.0, 4.0])
    out, w = fm.apply_model_prediction_type("sigma_scaled", pred, noisy, sig)  # default scheme: uniform
    close(w, [1.0, 1.0])
    out, w = fm.sd3_prediction(pred, noisy, sig, "cosmap")
    close(out.flatten(), [1.0, 0.5])
    close(w, [2 / (math.pi * (1 - 0.5 + 0.125)), 4 / math.pi])


def test_flow_matching_loss_on_hand_numbers():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])  # per-sample MSE 1 and 4
    close(fm.flow_matching_loss(pred, target), 2.5)
    close(fm.flow_matching_loss(pred, target, weighting=torch.tensor([4.0, 0.5])), (4 + 2) / 2)
    close(fm.flow_matching_loss(pred, target, weighting=torch.tensor([4.0, 0.5]).view(2, 1, 1, 1),
                                loss_weights=torch.tensor([1.0, 0.0])), 2.0)
    loss = fm.flow_matching_loss(pred.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_flux_step_end_to_end_on_known_inputs():
    """One FLUX step's numbers: sigma from the generator, noisy input, raw prediction, target and loss."""
    x = torch.zeros(1, 1, 2, 2)
    n = torch.ones(1, 1, 2, 2)
    sig, t = fm.sample_flux_sigmas("uniform", 1, latent_height=2, latent_width=2, generator=gen(7))
    s = torch.rand(1, generator=gen(7)).item()
    noisy = fm.add_flow_noise(x, n, sig)
    close(noisy, torch.full((1, 1, 2, 2), s))
    pred, w = fm.apply_model_prediction_type("raw", torch.zeros_like(x), noisy, sig)
    close(fm.flow_matching_loss(pred, fm.flux_target(x, n), w), 1.0)
    close(t, [s * 1000], rtol=1e-6, atol=1e-4)
