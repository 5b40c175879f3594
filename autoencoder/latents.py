"""The one owner of latents: what the autoencoder's latent space is, for every other package.

    moments = encoder(x)                          (B, 2C, h, w): posterior mean and log-variance
    z       = mean + exp(logvar / 2) * n,  n ~ N(0, I)      a draw (logvar clamped as diffusers does)
    latent  = (z - shift_factor) * scaling_factor           what a diffusion model sees (unit variance)

``scaling_factor`` (and the optional ``shift_factor``) are fitted once at export and live in the
saved ``vae/config.json``; nothing else reads or writes them. ``f`` (the downsampling factor) is
the encoder's: a (3, H, W) image becomes (C, H/f, W/f).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def downsampling_factor(vae: AutoencoderKL) -> int:
    """f: each encoder level but the last halves the image."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the posterior's moments (B, 2C, H/f, W/f): mean, then log-variance."""
    return vae.encode(x).latent_dist.parameters


def posterior(moments: torch.Tensor) -> DiagonalGaussianDistribution:
    """The posterior q(z | x) = N(mean, exp(logvar)) of moments (B, 2C, h, w), as the stage-1 loss reads it (its KL to
    N(0, I), a draw); diffusers' own distribution, so the clamp and the KL are the autoencoder's."""
    return DiagonalGaussianDistribution(moments)


def sample_latents(moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One raw draw z = mean + exp(logvar / 2) * n from posterior moments (B, 2C, h, w)
    (the autoencoder's DiagonalGaussianDistribution, with its logvar clamp)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    return mean + (0.5 * logvar).exp() * noise


def encode_latents(
    vae: AutoencoderKL, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised float32 latents (B, C, H/f, W/f): the posterior mean, or a draw."""
    posterior = vae.encode(x).latent_dist
    return normalize_latents(vae, (posterior.sample(generator) if sample else posterior.mode()).float())


def normalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Raw posterior sample -> the unit-variance latent a diffusion model sees."""
    shift = vae.config.get("shift_factor") or 0.0
    return (z - shift) * vae.config.scaling_factor


def denormalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    shift = vae.config.get("shift_factor") or 0.0
    return z / vae.config.scaling_factor + shift


@torch.no_grad()
def fit_latent_normalization(
    vae: AutoencoderKL, batches: Iterable[torch.Tensor], fit_shift: bool = False
) -> tuple[float, float | None]:
    """Fit ``scaling_factor`` (and ``shift_factor`` if asked) over posterior samples.

    As for Stable Diffusion: ``scaling_factor = 1 / std(z)``, so normalised latents have unit
    standard deviation. Without a shift, the std is taken about zero-centred data the way
    SD did (torch.std subtracts the mean) and the mean is assumed near 0; with ``fit_shift``
    the mean is removed explicitly (the SD3 / FLUX convention).
    Streaming sums in float64, so any number of batches fits in memory.
    """
    n, s1, s2 = 0, 0.0, 0.0
    for x in batches:
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample().double()  # (B, C, h, w), raw
        n += z.numel()
        s1 += z.sum().item()
        s2 += (z * z).sum().item()
    if n == 0:
        raise ValueError("no batches to fit the latent scale on")
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return 1.0 / std, (mean if fit_shift else None)


def latent_normalization(vae: AutoencoderKL) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor or None) as saved in the autoencoder's config."""
    return vae.config.scaling_factor, vae.config.get("shift_factor")


def set_latent_normalization(vae: AutoencoderKL, scale: float, shift: float | None) -> None:
    vae.register_to_config(scaling_factor=float(scale), shift_factor=None if shift is None else float(shift))
