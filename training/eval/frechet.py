"""FD-VGG: the Frechet distance between two image sets in the feature space of the pretrained VGG16
that LPIPS uses. It is NOT comparable to Inception FID (no Inception weights can be had offline)."""

from __future__ import annotations

import torch

from autoencoder.perceptual import LPIPS


def vgg_features(lpips: LPIPS, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1472): the channel means of LPIPS-VGG's five taps."""
    out = []
    with torch.inference_mode():
        for chunk in x.split(batch_size):
            out.append(torch.cat([f.float().mean(dim=(2, 3)) for f in lpips.features(chunk)], dim=1))
    return torch.cat(out).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), from (N, F) feature sets."""

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh(m)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))
