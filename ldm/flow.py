"""The flow-matching (rectified flow) training objective in the latent space, written as its equations.

Notation (Lipman et al. 2023, Liu et al. 2023; Esser et al. 2024, "SD3"): a noise level sigma in [0, 1] draws

    x_sigma = (1 - sigma) x_0 + sigma eps,       eps ~ N(0, I)

a straight path from the data (sigma = 0) to the noise (sigma = 1). The network predicts its velocity

    v = d x_sigma / d sigma = eps - x_0

at the timestep 1000 sigma, which is diffusers' convention (``FlowMatchEulerDiscreteScheduler`` samples
x_{sigma'} = x_sigma + (sigma' - sigma) v from sigma = 1 to 0). Training draws sigma from a density over
[0, 1] (SD3 section 3.1), through diffusers' ``compute_density_for_timestep_sampling``:

    uniform       u ~ U(0, 1)
    logit_normal  u = sigmoid(n), n ~ N(m, s^2): density  1 / (s sqrt(2 pi)) / (u (1 - u)) exp(-(logit u - m)^2 / (2 s^2))
    mode          u = 1 - w - c (cos^2(pi w / 2) - 1 + w), w ~ U(0, 1)   (c = mode_scale; c = 0 is uniform)

then moves it by SD3's resolution shift (the same map diffusers' flow scheduler applies to its sigmas):

    sigma = shift u / (1 + (shift - 1) u)        (shift = 1: sigma = u; shift > 1: more time near the noise)

and weights the per-sample loss by ``compute_loss_weighting_for_sd3`` (none: 1; sigma_sqrt: sigma^-2;
cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2))).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000  # timestep = 1000 sigma, as diffusers' flow scheduler gives the U-Net


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_flow_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x_0 + sigma eps, with ``sigma`` (B,) in [0, 1]."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity v = eps - x_0 the network learns (the same at every sigma of one path)."""
    return eps - x0


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of noise levels: shift u / (1 + (shift - 1) u); 0 and 1 stay where they are."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(
    n: int,
    generator: torch.Generator,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> torch.Tensor:
    """(n,) training noise levels in (0, 1): drawn from ``sampling``'s density, then shifted."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep sampling '{sampling}' is unknown; valid: {', '.join(TIMESTEP_SAMPLINGS)}")
    u = compute_density_for_timestep_sampling(
        sampling, n, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=generator
    )
    return shift_sigmas(u, shift)


def flow_loss_weights(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """(B,) per-sample loss weights of ``weighting`` at noise levels ``sigma``."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"flow loss weighting '{weighting}' is unknown; valid: {', '.join(LOSS_WEIGHTINGS)}")
    return compute_loss_weighting_for_sd3(weighting, sigma.float()).float()


def timesteps_of(sigma: torch.Tensor) -> torch.Tensor:
    """The U-Net's timestep for noise level ``sigma``: 1000 sigma (float), as the flow scheduler passes it."""
    return sigma * NUM_TRAIN_TIMESTEPS


def flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """A flow-matching model's schedule: 1,000 levels, ``shift`` (what an exported folder's scheduler/ holds)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
