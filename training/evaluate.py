"""Evaluate trained models and print the figures as JSON.

    python -m training.evaluate autoencoder --vae DIR --data DIR [--out FILE]
    python -m training.evaluate pipeline --model DIR --data DIR [--num-prompts N] [--steps S] [--guidance G] [--seed S]

``autoencoder``: PSNR (dB), SSIM and LPIPS-VGG of reconstructions (posterior mean) of every
image in an imagefolder (or save_to_disk folder), at the autoencoder's own resolution.

``pipeline``: for N captions of DIR (spread over it), one generated image each, then
(a) FD-VGG: the Frechet distance between generated and real images in the feature space of the
    pretrained VGG16 that LPIPS uses (channel means of its five taps, 1,472 numbers per image).
    It is NOT comparable to Inception FID. Floors from real data alone: N real images vs the rest
    (same sample sizes as the generated comparison) and two halves of the real data.
(b) prompt adherence: each generated image ranks its caption's real image among 20 candidates
    (it and 19 random others) by LPIPS distance; top-1 accuracy is reported (chance: 5%).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
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


def evaluate_pipeline(model_dir: str | Path, data_dir: str | Path, num_prompts: int = 100, steps: int = 25, guidance: float = 3.0,
                      seed: int = 0, data_cfg: DataConfig | None = None, candidates: int = 20, batch_size: int = 50,
                      max_real: int = 5000) -> dict:  # fmt: skip
    """FD-VGG (with real-data floors) and top-1 prompt adherence of a pipeline on a captioned dataset."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_scheduler("dpm++")
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.default_resolution
    cfg = replace(data_cfg or DataConfig(), path=str(data_dir), resolution=resolution, random_flip=False)
    records = load_records(data_dir, cfg)
    if len(records) > max_real:
        records = records.select(spread_indices(len(records), max_real))
    real, captions = [], []
    for batch in eval_loader(records, cfg, 256):
        if batch["index"]:
            real.append(batch["pixel_values"])
            captions += batch["text"]
    real = torch.cat(real)  # (N, 3, R, R) in [-1, 1]
    n = min(num_prompts, len(real) // 2)
    if n < 2 or len(real) < candidates:
        raise ValueError(f"{data_dir}: {len(real)} readable images; the evaluation needs at least {max(candidates, 4)}")
    chosen = spread_indices(len(real), n)

    generated = []
    for start in range(0, n, batch_size):
        part = chosen[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(part))]
        images = pipe([captions[i] for i in part], num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="pt").images  # (b, 3, R, R) in [0, 1]  # fmt: skip
        generated.append(images.float().cpu() * 2 - 1)
    generated = torch.cat(generated)

    lpips = LPIPS.pretrained()
    real_f, gen_f = vgg_features(lpips, real), vgg_features(lpips, generated)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(real), generator=g)
    rest = torch.ones(len(real), dtype=torch.bool)
    rest[perm[:n]] = False
    halves = perm[: len(real) // 2], perm[len(real) // 2 :]

    hits = 0
    with torch.inference_mode():
        for k, i in enumerate(chosen):
            others = torch.tensor([j for j in torch.randperm(len(real), generator=g).tolist() if j != i][: candidates - 1])
            pool = torch.cat([torch.tensor([i]), others])  # the true image first
            d = lpips(generated[k : k + 1].expand(len(pool), -1, -1, -1), real[pool])
            hits += int(d.argmin().item() == 0)
    return {
        "model": str(model_dir), "data": str(data_dir), "resolution": resolution, "prompts": n, "steps": steps, "guidance": guidance,
        "fd_vgg": frechet_distance(gen_f, real_f),
        "fd_vgg_floor_real_sample": frechet_distance(real_f[perm[:n]], real_f[rest]),
        "fd_vgg_real_halves": frechet_distance(real_f[halves[0]], real_f[halves[1]]),
        "prompt_top1": hits / n, "prompt_top1_chance": 1 / candidates, "candidates": candidates,
    }  # fmt: skip


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
    pl = sub.add_parser("pipeline", help="FD-VGG and prompt adherence of a pipeline folder on a captioned dataset")
    pl.add_argument("--model", required=True, type=Path, help="a pipeline folder")
    pl.add_argument("--data", required=True, type=Path, help="a captioned imagefolder, e.g. data/openmoji-32/train")
    pl.add_argument("--num-prompts", type=int, default=100)
    pl.add_argument("--steps", type=int, default=25)
    pl.add_argument("--guidance", type=float, default=3.0)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        if args.what == "autoencoder":
            result = evaluate_autoencoder(args.vae, args.data, args.resolution, args.batch_size, args.image_column, args.max_images,
                                          args.grid)  # fmt: skip
        else:
            result = evaluate_pipeline(args.model, args.data, args.num_prompts, args.steps, args.guidance, args.seed)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
