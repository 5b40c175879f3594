"""The training objective against its closed forms (DDPM noising, v target, min-SNR weights)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import add_noise, min_snr_weights, offset_noise, snr, training_scheduler, v_target


@pytest.fixture(scope="module")
def abar():
    return training_scheduler().alphas_cumprod


def test_schedule_is_stable_diffusions(abar):
    # scaled-linear: beta_t = (sqrt(0.00085) + t/999 (sqrt(0.012) - sqrt(0.00085)))^2
    betas = [(math.sqrt(0.00085) + t / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2 for t in range(1000)]
    expected = [math.prod(1 - b for b in betas[: t + 1]) for t in (0, 499, 999)]
    assert torch.allclose(abar[[0, 499, 999]].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4)


def test_noising_matches_the_closed_form_and_the_diffusers_scheduler(abar):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = add_noise(x0, eps, t, abar)
    for i, ti in enumerate(t.tolist()):
        a = float(abar[ti])
        assert torch.allclose(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)
    assert torch.allclose(x_t, training_scheduler().add_noise(x0, eps, t), atol=1e-6)
    # variance preserving: unit-variance data stays unit-variance at every t
    big = torch.randn(20000, generator=g)
    assert abs(float(add_noise(big, torch.randn(20000, generator=g), torch.full((20000,), 700), abar).std()) - 1) < 0.02


def test_v_target_is_its_definition_and_recovers_x0_and_eps(abar):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([5, 300, 900])
    v = v_target(x0, eps, t, abar)
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(v, training_scheduler("v_prediction").get_velocity(x0, eps, t), atol=1e-6)
    x_t = add_noise(x0, eps, t, abar)  # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(abar, prediction_type):
    t = torch.tensor([0, 100, 400, 999])
    w = min_snr_weights(t, abar, 5.0, prediction_type)
    for i, ti in enumerate(t.tolist()):
        a = float(abar[ti])
        s = a / (1 - a)
        expected = min(s, 5.0) / (s if prediction_type == "epsilon" else s + 1)
        assert w[i].item() == pytest.approx(expected, rel=1e-4)
    # eps: weight 1 wherever SNR <= gamma; v: never more than 1, and smaller than the eps weight
    low_snr = snr(t, abar) <= 5
    if prediction_type == "epsilon":
        assert torch.allclose(w[low_snr], torch.ones(int(low_snr.sum())))
    else:
        assert (w <= 1).all() and (w < min_snr_weights(t, abar, 5.0, "epsilon")).all()


def test_min_snr_weight_is_the_x0_space_weight_for_both_targets(abar):
    """Weighted target-space loss == min(SNR, gamma) * ||x0 - x0_hat||^2 for either target."""
    g = torch.Generator().manual_seed(2)
    x0, eps, err = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([250])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = add_noise(x0, eps, t, abar)
    x0_hat = x0 + 0.1 * err
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()  # the eps that implies x0_hat
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    x0_loss = float(((x0 - x0_hat) ** 2).mean()) * min(float(snr(t, abar)), 5.0)
    eps_loss = float(((eps - eps_hat) ** 2).mean()) * float(min_snr_weights(t, abar, 5.0, "epsilon"))
    v_loss = float(((v_target(x0, eps, t, abar) - v_hat) ** 2).mean()) * float(min_snr_weights(t, abar, 5.0, "v_prediction"))
    assert eps_loss == pytest.approx(x0_loss, rel=1e-3) and v_loss == pytest.approx(x0_loss, rel=1e-3)


def test_zero_terminal_snr_schedule_and_weights():
    s = training_scheduler("v_prediction", zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12) and s.config.timestep_spacing == "trailing"
    w = min_snr_weights(torch.tensor([999]), s.alphas_cumprod, 5.0, "v_prediction")
    assert torch.isfinite(w).all() and w.item() == 0.0


def test_offset_noise_shifts_each_channel_by_a_constant():
    eps, per_channel = torch.zeros(2, 4, 3, 3), torch.arange(8.0).view(2, 4)
    out = offset_noise(eps, 0.1, per_channel)
    assert torch.allclose(out[1, 2], torch.full((3, 3), 0.6))


