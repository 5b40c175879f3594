"""Reconstruction figures of an autoencoder on held-out and out-of-domain images, beside the simple
codes of its latent's size (bicubic resizing, PCA): ``python -m training.evaluate autoencoder``."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from autoencoder import downsampling_factor, load_autoencoder
from autoencoder.metrics import Code, autoencoder_code, compare_codes, reconstruct
from autoencoder.perceptual import LPIPS
from autoencoder.references import PCACode, bicubic_code, bicubic_side, pca_fits
from runtime.images import save_grid
from training.data.loader import eval_loader, spread_indices
from training.data.records import DataConfig, load_records


def load_images(records, cfg: DataConfig, max_images: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """Every readable image of ``records`` (or ``max_images`` spread over them): (N, 3, R, R) in [-1, 1]."""
    if max_images and len(records) > max_images:
        records = records.select(spread_indices(len(records), max_images))
    parts = [b["pixel_values"] for b in eval_loader(records, cfg, batch_size) if b["pixel_values"].numel()]
    if not parts:
        raise ValueError(f"no readable images in '{cfg.path}'")
    return torch.cat(parts)


def latent_values(vae: AutoencoderKL, resolution: int) -> int:
    """How many numbers the latent of one ``resolution`` x ``resolution`` image holds."""
    side = resolution // downsampling_factor(vae)
    return int(vae.config.latent_channels) * side * side


def reference_codes(num_values: int, train_images: torch.Tensor | None) -> dict[str, Code]:
    """The simple codes of ``num_values`` numbers an autoencoder is read against: bicubic always,
    PCA when training images are given (load them only where :func:`pca_fits`)."""
    k = bicubic_side(num_values)
    codes: dict[str, Code] = {f"bicubic_{k}x{k}": lambda x: bicubic_code(x, num_values)}
    if train_images is not None:
        codes[f"pca_{num_values}"] = PCACode.fit(train_images, num_values)
    return codes


def autoencoder_report(
    vae: AutoencoderKL,
    held_out: dict[str, torch.Tensor],
    train_images: torch.Tensor | None = None,
    lpips: LPIPS | None = None,
    batch_size: int = 64,
) -> dict:
    """Reconstruction figures of ``vae`` on each named image set, beside references of its latent size.

    ``held_out``: {name: (N, 3, R, R) images in [-1, 1]}; the first is the in-domain held-out
    split, whose figures go at the top level; every other set goes under ``ood``. Each set gets
    PSNR / SSIM / LPIPS / colour error, and the same for the bicubic and PCA codes (PCA fitted on
    ``train_images``) under ``references``."""
    lpips = (lpips or LPIPS.pretrained()).float().cpu()
    resolution = next(iter(held_out.values())).shape[-1]
    n = latent_values(vae, resolution)
    codes = {"vae": autoencoder_code(vae), **reference_codes(n, train_images)}
    report: dict = {"latent_values": n, "resolution": resolution}
    for i, (name, images) in enumerate(held_out.items()):
        figures = compare_codes(codes, images.split(batch_size), lpips)
        entry = figures.pop("vae") | {"references": figures}
        if i == 0:
            report |= {"split": name, **entry}
        else:
            report.setdefault("ood", {})[name] = entry
    return report


def ood_sets(paths: list[str] | tuple[str, ...], resolution: int, max_images: int | None = None) -> dict[str, torch.Tensor]:
    """{folder name: images} for out-of-domain imagefolders (``--ood``, ``eval.ood``)."""
    sets = {}
    for path in paths:
        cfg = DataConfig(path=str(path), resolution=resolution, eval_split=None)
        name = Path(path).name
        if name in sets:
            raise ValueError(f"two out-of-domain folders are named '{name}'; give them different names")
        sets[name] = load_images(load_records(path, cfg), cfg, max_images)
    return sets


def evaluate_autoencoder(
    vae_dir: str | Path,
    data_dir: str | Path,
    resolution: int | None = None,
    batch_size: int = 64,
    image_column: str = "image",
    max_images: int | None = None,
    grid: str | Path | None = None,
    grid_images: int = 12,
    train_data: str | Path | None = None,
    ood: list[str] | tuple[str, ...] = (),
    pca_fit_images: int = 4096,
) -> dict:
    """Reconstruction figures of ``vae_dir`` on every image of ``data_dir`` and of each ``ood`` folder,
    beside the bicubic reference and a PCA fitted on ``train_data`` (default: the ``train/`` folder
    beside ``data_dir``, if there is one). ``grid`` also saves a PNG of ``grid_images`` inputs
    (top row) over their reconstructions (bottom row)."""
    vae = load_autoencoder(vae_dir).eval()
    resolution = resolution or int(vae.config.sample_size)
    cfg = DataConfig(path=str(data_dir), resolution=resolution, image_column=image_column)
    records = load_records(data_dir, cfg)
    if max_images:
        records = records.select(range(min(max_images, len(records))))
    if train_data is None and Path(data_dir).name != "train" and (Path(data_dir).parent / "train").is_dir():
        train_data = Path(data_dir).parent / "train"
    train_images = None
    if train_data is not None and pca_fits(resolution):
        train_cfg = DataConfig(path=str(train_data), resolution=resolution, image_column=image_column)
        train_images = load_images(load_records(train_data, train_cfg), train_cfg, pca_fit_images)
    with torch.inference_mode():
        sets = {Path(data_dir).name: load_images(records, cfg)} | ood_sets(ood, resolution, max_images)
        metrics = autoencoder_report(vae, sets, train_images, batch_size=batch_size)
        if grid:  # per set: grid_images spread over it, over their reconstructions
            rows = []
            for images in sets.values():
                x = images[spread_indices(len(images), grid_images)]
                rows += [x, reconstruct(vae, x)]
            save_grid(rows, grid, scale=3)
    return {"vae": str(vae_dir), "data": str(data_dir), "train_data": None if train_data is None else str(train_data), **metrics}
