"""Reconstruction quality: PSNR, SSIM (torchmetrics) and LPIPS on held-out images."""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers import AutoencoderKL
from torchmetrics.functional.image import structural_similarity_index_measure

from .perceptual import LPIPS


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]: (B, C, H, W) x2 -> (B,)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """decode(mean of q(z|x)), clamped to [-1, 1]: the deterministic reconstruction."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, batches: Iterable[torch.Tensor], lpips: LPIPS) -> dict[str, float]:
    """Mean PSNR / SSIM / LPIPS of ``decode(mode(encode(x)))`` over images in [-1, 1], in fp32."""
    totals = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    for x in batches:
        x = x.to(vae.device, torch.float32)
        x_hat = reconstruct(vae, x)
        a, b = (x + 1) / 2, (x_hat + 1) / 2  # (B, 3, H, W) in [0, 1]
        totals["psnr"] += psnr(a, b).sum().item()
        totals["ssim"] += structural_similarity_index_measure(b, a, data_range=1.0, reduction="none").sum().item()
        totals["lpips"] += lpips.to(x.device)(x, x_hat).sum().item()
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    return {k: v / n for k, v in totals.items()} | {"num_images": n}
