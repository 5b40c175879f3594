"""Evaluate trained models and print the figures as JSON.

    python -m training.evaluate autoencoder --vae DIR --data DIR [--out FILE]

``autoencoder``: PSNR (dB), SSIM and LPIPS-VGG of reconstructions (posterior mean) of every
image in an imagefolder (or save_to_disk folder), at the autoencoder's own resolution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from autoencoder import load_autoencoder
from autoencoder.metrics import reconstruct, reconstruction_metrics
from autoencoder.perceptual import LPIPS
from training.data import DataConfig, eval_loader, load_records, spread_indices
from training.utils import save_grid, write_json_atomic


def evaluate_autoencoder(vae_dir: str | Path, data_dir: str | Path, resolution: int | None = None,
                         batch_size: int = 64, image_column: str = "image", max_images: int | None = None,
                         grid: str | Path | None = None, grid_images: int = 12) -> dict:
    """Reconstruction metrics of ``vae_dir`` on every image of ``data_dir``; ``grid`` also saves
    a PNG of ``grid_images`` inputs (top row) over their reconstructions (bottom row)."""
    vae = load_autoencoder(vae_dir).eval()
    resolution = resolution or int(vae.config.sample_size)
    cfg = DataConfig(path=str(data_dir), resolution=resolution, image_column=image_column)
    records = load_records(data_dir, cfg)
    if max_images:
        records = records.select(range(min(max_images, len(records))))
    batches = (b["pixel_values"] for b in eval_loader(records, cfg, batch_size) if b["pixel_values"].numel())
    with torch.inference_mode():
        metrics = reconstruction_metrics(vae, batches, LPIPS.pretrained())
        if grid:
            x = next(iter(eval_loader(records.select(spread_indices(len(records), grid_images)), cfg, grid_images)))["pixel_values"]
            save_grid([x, reconstruct(vae, x)], grid, scale=3)
    return {"vae": str(vae_dir), "data": str(data_dir), "resolution": resolution, **metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ae = sub.add_parser("autoencoder", help="reconstruction PSNR / SSIM / LPIPS of a vae/ folder")
    ae.add_argument("--vae", required=True, type=Path, help="a vae/ folder (AutoencoderKL)")
    ae.add_argument("--data", required=True, type=Path, help="an imagefolder, e.g. data/openmoji-32/test")
    ae.add_argument("--resolution", type=int, default=None, help="default: the autoencoder's sample_size")
    ae.add_argument("--batch-size", type=int, default=64)
    ae.add_argument("--image-column", default="image")
    ae.add_argument("--max-images", type=int, default=None)
    ae.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ae.add_argument("--grid", type=Path, default=None, help="also save inputs over reconstructions as a PNG")
    args = parser.parse_args(argv)
    try:
        result = evaluate_autoencoder(args.vae, args.data, args.resolution, args.batch_size, args.image_column, args.max_images,
                                     args.grid)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
