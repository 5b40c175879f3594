"""Stage 1's reconstruction grids: fixed preview images over their reconstructions, and a running
held-out PSNR."""

from __future__ import annotations

from pathlib import Path

import torch

from autoencoder.metrics import psnr, reconstruct
from runtime.images import save_grid
from training.autoencoder_config import AutoencoderJobConfig
from training.data.loader import eval_loader, spread_indices
from training.data.records import DataError


def preview_batch(records, cfg: AutoencoderJobConfig, n: int) -> torch.Tensor:
    """``n`` images spread evenly over the split (neighbours are often near-duplicates)."""
    loader = eval_loader(records.select(spread_indices(len(records), n)), cfg.data, n)
    x = next(iter(loader))["pixel_values"]
    if x.numel() == 0:
        raise DataError(f"none of the {n} preview images (sample grids, val_psnr) could be read")
    return x


@torch.no_grad()
def save_reconstructions(vae, x: torch.Tensor, path: Path, rows: int = 8) -> float:
    """Saves input over reconstruction (posterior mean, fp32) for ``rows`` images; returns PSNR over all of ``x``."""
    was_training = vae.training
    vae.eval()
    x = x.to(vae.device)
    x_hat = reconstruct(vae, x)
    vae.train(was_training)
    save_grid([x[:rows], x_hat[:rows]], path, scale=4)
    return psnr((x + 1) / 2, (x_hat + 1) / 2).mean().item()
