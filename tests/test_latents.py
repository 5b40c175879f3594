"""autoencoder/latents.py, the one owner of latents: draws from the posterior, its KL, the fitted
normalisation and its inverse."""

from __future__ import annotations

import math

import pytest
import torch

from autoencoder import build_autoencoder
from autoencoder.latents import (
    denormalize_latents,
    fit_latent_normalization,
    latent_normalization,
    normalize_latents,
    posterior,
    sample_latents,
    set_latent_normalization,
)


def test_latent_sampling_from_moments():
    mean, logvar = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), math.log(0.25))
    noise = torch.ones(1, 4, 2, 2)
    assert torch.allclose(sample_latents(torch.cat([mean, logvar], 1), noise), torch.full((1, 4, 2, 2), 3.5))


def test_scale_fit_gives_unit_std_latents():
    torch.manual_seed(0)
    vae = build_autoencoder("tiny", 16).eval()
    data = [torch.rand(8, 3, 16, 16) * 2 - 1 for _ in range(6)]
    scale, shift = fit_latent_normalization(vae, data)
    assert shift is None
    set_latent_normalization(vae, scale, shift)
    torch.manual_seed(1)
    z = torch.cat([normalize_latents(vae, vae.encode(x).latent_dist.sample()) for x in data])
    assert abs(z.std().item() - 1.0) < 0.05
    # with a fitted shift the mean is removed too
    scale, shift = fit_latent_normalization(vae, data, fit_shift=True)
    set_latent_normalization(vae, scale, shift)
    z = torch.cat([normalize_latents(vae, vae.encode(x).latent_dist.sample()) for x in data])
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.05
    assert torch.allclose(denormalize_latents(vae, normalize_latents(vae, data[0][:, :1])), data[0][:, :1], atol=1e-5)


def test_the_posterior_is_the_diagonal_gaussian_of_the_moments_with_its_closed_form_kl():
    mean, logvar = torch.tensor([[[[0.5]], [[-1.0]]]]), torch.tensor([[[[math.log(4.0)]], [[0.0]]]])  # (1, 2, 1, 1) each
    q = posterior(torch.cat([mean, logvar], 1))
    assert torch.equal(q.mean, mean) and torch.allclose(q.std, torch.tensor([[[[2.0]], [[1.0]]]]))
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2, summed over the latent
    expected = ((0.25 + 4 - 1 - math.log(4.0)) + (1.0 + 1 - 1 - 0.0)) / 2
    assert q.kl().item() == pytest.approx(expected, rel=1e-6)


def test_normalised_latents_come_back_through_denormalisation_with_scale_and_shift():
    vae = build_autoencoder("tiny", 32)
    z = torch.randn(2, vae.config.latent_channels, 8, 8) * 3 + 1
    for scale, shift in ((0.5, None), (0.25, 1.5)):
        set_latent_normalization(vae, scale, shift)
        assert latent_normalization(vae) == (scale, shift)
        assert torch.allclose(normalize_latents(vae, z), (z - (shift or 0.0)) * scale)
        assert torch.allclose(denormalize_latents(vae, normalize_latents(vae, z)), z, atol=1e-6)
