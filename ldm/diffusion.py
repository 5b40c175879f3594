"""The DDPM training objective in the latent space, written as its equations.

Notation (Ho et al. 2020): ``abar_t = prod_{s<=t} (1 - beta_s)`` is the scheduler's
``alphas_cumprod``. The forward process draws

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,       eps ~ N(0, I)

and the network predicts eps ("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
("v_prediction", Salimans & Ho 2022). The signal-to-noise ratio is SNR(t) = abar_t / (1 - abar_t).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ldm.flow import flow_scheduler
from ldm.schedulers import flow_shift, is_flow
from runtime.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def training_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDPMScheduler:
    """Stable Diffusion's noise schedule (1000 steps, scaled-linear betas 0.00085..0.012).

    ``zero_terminal_snr`` rescales the betas so that abar_T = 0 (Lin et al. 2023): the last step is
    pure noise, as at sampling time; samplers must then space timesteps "trailing", which is
    written into the config so every sampler built from it does.
    """
    check_prediction_type(prediction_type)
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
    )


def training_scheduler_of(folder: str | Path) -> DDPMScheduler:
    """The training schedule of a pipeline folder's ``scheduler/`` (fine-tuning keeps the model's own), its prediction
    type checked as :func:`training_scheduler` checks a new one's; a flow-matching folder's is its flow schedule."""
    config = DDPMScheduler.load_config(folder)
    if is_flow(config):  # a flow-matching model
        return flow_scheduler(flow_shift(config))
    scheduler = DDPMScheduler.from_config(config)
    check_prediction_type(scheduler.config.prediction_type, where=f"{folder}: ")
    return scheduler


def check_prediction_type(prediction_type: str, where: str = "") -> str:
    """The prediction types the objective and the samplers know, checked where a schedule is made: eps or v."""
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"{where}prediction_type '{prediction_type}' is unknown; valid: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over a (B, C, h, w) batch."""
    return values.to(like.device)[t].float().view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), one value per sample."""
    abar = alphas_cumprod.to(t.device)[t].double()
    return (abar / (1 - abar)).float()


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample.

    The paper weights the x_0-space loss by min(SNR, gamma). Written in the network's own target:
    eps-prediction: ||eps - eps_hat||^2 = SNR ||x_0 - x_0_hat||^2, so the weight is min(SNR, gamma) / SNR;
    v-prediction:   ||v - v_hat||^2 = (SNR + 1) ||x_0 - x_0_hat||^2, so the weight is min(SNR, gamma) / (SNR + 1).
    (Using the eps formula for v, a known bug elsewhere, under-weights every noisy step.)
    """
    s = snr(t, alphas_cumprod)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if prediction_type == "epsilon":
        return clipped / s.clamp_min(1e-8)  # at SNR = 0 (zero terminal SNR) the weight is 0, not 0/0
    return clipped / (s + 1)  # v_prediction (the schedule's factory checked it is one of the two)


def offset_noise(eps: torch.Tensor, strength: float, per_channel: torch.Tensor) -> torch.Tensor:
    """eps + strength * n_c with one n_c ~ N(0, 1) per sample and channel (Guttenberg 2023): lets the
    model change an image's mean colour, which plain eps noise almost never does.
    ``per_channel``: (B, C) standard normal draws."""
    return eps + strength * per_channel[..., None, None].to(eps)
