"""Reconstruction quality: PSNR, SSIM (torchmetrics), LPIPS and colour error on held-out images,
for an autoencoder and for the simple codes it is read against (:mod:`autoencoder.references`)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchmetrics.functional.image import structural_similarity_index_measure

from .perceptual import LPIPS

COLOUR_BLOCK = 8  # pixels per side of the blocks whose mean colours the colour error compares

Code = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [-1, 1] -> its reconstruction


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]: (B, C, H, W) x2 -> (B,)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def colour_error(a: torch.Tensor, b: torch.Tensor, block: int = COLOUR_BLOCK) -> torch.Tensor:
    """Per-image colour error for images in [0, 1]: (B, 3, H, W) x2 -> (B,), in 0-255 levels.

    The mean absolute difference between the ``block`` x ``block`` block averages of ``a`` and
    ``b`` (per channel; a partial block at the right / bottom edge is left out). Shapes and
    edges average away; what remains is whether each region came back in its own colour."""
    if min(a.shape[-2:]) < block:
        raise ValueError(f"images of {tuple(a.shape[-2:])} pixels are smaller than one {block}x{block} colour block")
    pa, pb = F.avg_pool2d(a.float(), block), F.avg_pool2d(b.float(), block)  # (B, 3, H/block, W/block)
    return 255.0 * (pa - pb).abs().flatten(1).mean(1)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """decode(mean of q(z|x)), clamped to [-1, 1]: the deterministic reconstruction."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def compare_codes(codes: dict[str, Code], batches: Iterable[torch.Tensor], lpips: LPIPS | None) -> dict[str, dict[str, float]]:
    """Mean PSNR / SSIM / LPIPS / colour error of each code's reconstruction of images in
    [-1, 1], over the same images, in fp32: ``{name: {"psnr": ..., ...}}`` (no LPIPS if ``lpips`` is None)."""
    names = ("psnr", "ssim", "lpips", "colour_error") if lpips is not None else ("psnr", "ssim", "colour_error")
    totals = {code: dict.fromkeys(names, 0.0) for code in codes}
    n = 0
    for x in batches:
        x = x.float()
        a = (x + 1) / 2  # (B, 3, H, W) in [0, 1]
        for code, fn in codes.items():
            x_hat = fn(x).float().clamp(-1, 1)
            b = (x_hat + 1) / 2
            t = totals[code]
            t["psnr"] += psnr(a, b).sum().item()
            t["ssim"] += structural_similarity_index_measure(b, a, data_range=1.0, reduction="none").sum().item()
            if lpips is not None:
                t["lpips"] += lpips.to(x.device)(x, x_hat).sum().item()
            t["colour_error"] += colour_error(a, b).sum().item()
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    return {code: {k: v / n for k, v in t.items()} | {"num_images": n} for code, t in totals.items()}


def autoencoder_code(vae: AutoencoderKL) -> Code:
    """The autoencoder as a code: fp32 ``decode(mode(encode(x)))`` on the autoencoder's device."""
    return lambda x: reconstruct(vae, x.to(vae.device, vae.dtype)).float().cpu()
