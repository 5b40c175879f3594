"""What a stage-1 run leaves: the autoencoder folder with its fitted latent scale, and metrics.json."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from autoencoder import fit_latent_normalization, latent_normalization, save_autoencoder, set_latent_normalization
from autoencoder.perceptual import LPIPS
from autoencoder.references import pca_fits
from runtime.files import write_json_atomic
from training.autoencoder_config import AutoencoderJobConfig
from training.config import to_dict
from training.data.loader import train_loader
from training.data.sampler import BatchStream
from training.eval.autoencoder import autoencoder_report, load_images, ood_sets
from training.run.guard import check_finite


def export_autoencoder(
    vae, records, held_out, lpips: LPIPS, cfg: AutoencoderJobConfig, out: Path, bad_images: int, steps: int
) -> Path:
    """``out/vae`` (diffusers layout, with the latent normalisation fitted on the training images unless only the decoder
    trained) and ``out/metrics.json``: held-out and out-of-domain figures beside bicubic and PCA. Refused if a weight is
    not finite."""
    if bad_images:
        print(f"skipped {bad_images} unreadable image(s); see log.jsonl")
    check_finite(vae, "autoencoder")
    vae.eval()
    fit_batch = min(cfg.eval.batch_size, len(records))
    fit_loader = train_loader(
        records, cfg.data, BatchStream(len(records), fit_batch, cfg.seed + 1, random_flip=cfg.data.random_flip)
    )
    n_fit = min(cfg.train.scale_fit_batches, math.ceil(len(records) / fit_batch))  # about one pass at most
    fit_batches = (b["pixel_values"] for b, _ in zip(fit_loader, range(n_fit)) if b["pixel_values"].numel())
    if cfg.train.decoder_only:  # the latent space did not change: keep its normalisation
        scale, shift = latent_normalization(vae)
    else:
        scale, shift = fit_latent_normalization(vae, fit_batches, fit_shift=cfg.train.fit_shift)
        set_latent_normalization(vae, scale, shift)
    vae_dir = save_autoencoder(vae, out / "vae")
    metrics: dict = {
        "scaling_factor": scale,
        "shift_factor": shift,
        "steps": steps,  # train.max_steps, or fewer where train.max_minutes ended the run
        "bad_images": bad_images,
        "mixed_precision": cfg.train.mixed_precision.accelerate_name(str(vae.device)),
        "precision_reason": cfg.train.mixed_precision.reason(str(vae.device)),
    }
    if held_out is not None:  # in domain first, then every eval.ood folder; each beside bicubic and PCA
        if cfg.eval.max_images:
            held_out = held_out.select(range(min(cfg.eval.max_images, len(held_out))))
        sets = {cfg.data.eval_split: load_images(held_out, cfg.data)}
        sets |= ood_sets(cfg.eval.ood, cfg.data.resolution, cfg.eval.max_images)
        train_images = load_images(records, cfg.data, cfg.eval.pca_fit_images) if pca_fits(cfg.data.resolution) else None
        with torch.no_grad():
            metrics |= autoencoder_report(vae, sets, train_images, lpips, cfg.eval.batch_size)
    metrics["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"saved {vae_dir}; metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return vae_dir
