"""The stage-2 training loss as one object: (x_0, eps, t) -> per-sample loss.

    x_t    = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                  (eps + offset noise, if any)
    target = eps                                  (prediction_type "epsilon")
           | sqrt(abar_t) eps - sqrt(1 - abar_t) x_0    ("v_prediction")
    loss_i = w_i * mean over (C, h, w) of m_hw (model(x_t, t) - target)^2,
    w_i    = min-SNR-gamma weight in the target's own space (1 when min_snr_gamma is None)
    m_hw   = the loss mask on the latent grid, in [0, 1] (masked loss; 1 everywhere without one)

Flow matching (``FlowObjective``, ``objective.type: flow``; ldm/flow.py):

    x_sigma = (1 - sigma) x_0 + sigma eps,   target = eps - x_0,   timestep = 1000 sigma
    loss_i  = w(sigma_i) * mean over (C, h, w) of m_hw (model(x_sigma, 1000 sigma) - target)^2

The formulas themselves live in ``ldm.diffusion`` and ``ldm.flow``; this is where a training job picks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ldm.diffusion import add_noise, min_snr_weights, offset_noise, v_target
from ldm.flow import add_flow_noise, flow_loss_weights, flow_target, timesteps_of


def masked_mean_squared_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,): the mean over (C, h, w) of the squared error, each element times ``mask`` (B, 1, h, w) when given (kohya's
    masked loss: the mean stays over every element, so an all-ones mask is the plain loss exactly)."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    return error.mean(dim=tuple(range(1, target.ndim)))


class DenoisingObjective:
    draw = "t"  # the step's draw this objective's noise level is: an integer timestep

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The U-Net's timestep at noise level ``t``: t itself."""
        return t

    def __init__(self, scheduler: DDPMScheduler, min_snr_gamma: float | None = None, offset_noise: float = 0.0) -> None:
        self.alphas_cumprod = scheduler.alphas_cumprod  # (T,)
        self.prediction_type = scheduler.config.prediction_type  # eps or v: checked where the schedule was made
        self.min_snr_gamma, self.offset_noise = min_snr_gamma, offset_noise

    def noisy_input_and_target(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, offset_draws: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target), both (B, C, h, w). ``offset_draws``: (B, C) standard normal draws (offset noise)."""
        if self.offset_noise:
            eps = offset_noise(eps, self.offset_noise, offset_draws)
        x_t = add_noise(x0, eps, t, self.alphas_cumprod)
        target = eps if self.prediction_type == "epsilon" else v_target(x0, eps, t, self.alphas_cumprod)
        return x_t, target

    def per_sample_loss(
        self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,): the (min-SNR weighted) mean squared error of each sample, each element weighted by ``mask``
        (B, 1, h, w) where one is given."""
        loss = masked_mean_squared_error(prediction, target, mask)
        if self.min_snr_gamma:
            loss = loss * min_snr_weights(t, self.alphas_cumprod, self.min_snr_gamma, self.prediction_type)
        return loss


class FlowObjective:
    draw = "sigma"  # the step's draw this objective's noise level is: sigma in (0, 1)

    def __init__(self, weighting: str = "none", offset_noise: float = 0.0) -> None:
        self.weighting, self.offset_noise = weighting, offset_noise

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The U-Net's timestep at noise level ``sigma``: 1000 sigma, as diffusers' flow schedulers give it."""
        return timesteps_of(sigma)

    def noisy_input_and_target(
        self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, offset_draws: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_sigma, v), both (B, C, h, w)."""
        if self.offset_noise:
            eps = offset_noise(eps, self.offset_noise, offset_draws)
        return add_flow_noise(x0, eps, sigma), flow_target(x0, eps)

    def per_sample_loss(
        self, prediction: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,): the (weighted) mean squared error of each sample, each element weighted by ``mask`` (B, 1, h, w)
        where one is given."""
        loss = masked_mean_squared_error(prediction, target, mask)
        return loss * flow_loss_weights(sigma, self.weighting).to(loss.device)
