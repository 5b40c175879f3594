"""ldm/objective.py: the training loss object against the formulas it is built from."""

from __future__ import annotations

import math

import torch

from ldm.diffusion import training_scheduler
from ldm.objective import DenoisingObjective


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g), torch.tensor([5, 400, 990])


def test_epsilon_objective_noises_by_the_closed_form_and_targets_the_noise():
    x0, eps, t = _batch()
    sched = training_scheduler("epsilon")
    x_t, target = DenoisingObjective(sched).noisy_input_and_target(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        a = float(sched.alphas_cumprod[ti])
        assert torch.allclose(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)
    assert torch.equal(target, eps)


def test_v_objective_targets_v_and_offset_noise_enters_both_input_and_target():
    x0, eps, t = _batch(1)
    sched = training_scheduler("v_prediction")
    offsets = torch.ones(3, 4)
    x_t, target = DenoisingObjective(sched, offset_noise=0.1).noisy_input_and_target(x0, eps, t, offsets)
    shifted = eps + 0.1  # every channel moved by 0.1 * 1
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * shifted, atol=1e-6)
    assert torch.allclose(target, a.sqrt() * shifted - (1 - a).sqrt() * x0, atol=1e-6)


def test_per_sample_loss_is_the_mse_of_each_sample_times_its_min_snr_weight():
    x0, eps, t = _batch(2)
    sched = training_scheduler("epsilon")
    pred = eps + 0.5 * torch.arange(3.0).view(3, 1, 1, 1)  # errors 0, 0.5, 1.0 everywhere
    plain = DenoisingObjective(sched).per_sample_loss(pred, eps, t)
    assert torch.allclose(plain, torch.tensor([0.0, 0.25, 1.0]))
    weighted = DenoisingObjective(sched, min_snr_gamma=5.0).per_sample_loss(pred, eps, t)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    assert torch.allclose(weighted, plain * torch.clamp(snr, max=5.0) / snr, atol=1e-6)


def test_the_flow_objective_is_the_straight_path_its_velocity_and_sd3s_weights():
    import math

    from ldm.objective import FlowObjective

    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.8])
    x, target = FlowObjective().noisy_input_and_target(x0, eps, sigma)
    assert torch.allclose(x, (1 - sigma.view(3, 1, 1, 1)) * x0 + sigma.view(3, 1, 1, 1) * eps) and torch.equal(target, eps - x0)
    assert torch.allclose(FlowObjective().timestep(sigma), 1000 * sigma)  # what diffusers' flow schedulers give the U-Net
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(FlowObjective().per_sample_loss(pred, target, sigma), mse)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert torch.allclose(FlowObjective("cosmap").per_sample_loss(pred, target, sigma), mse * cosmap)
