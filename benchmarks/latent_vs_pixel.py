"""Latent vs pixel space: the cost of one generated 64x64 image with an f=4 latent model (U-Net on
4x16x16 latents + one autoencoder decode) vs a pixel-space U-Net of the same width (the same preset)
on 3x64x64 images, both at the pipeline's defaults (bf16 where bf16 is fast), 25 steps with
classifier-free guidance (U-Net batch 2 per image), 4 images per batch.

    .venv/bin/python benchmarks/latent_vs_pixel.py [--json out.json]

Reports FLOPs per image (torch.utils.flop_counter, attention through the math path so that it is
counted) and measured seconds per image. The pixel model's 25 steps are timed as 25x its median
forward (one forward takes seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime  # noqa: E402
from autoencoder.model import build_autoencoder  # noqa: E402
from ldm.pipeline import resolve_dtype  # noqa: E402
from ldm.unet import build_unet  # noqa: E402
from timing import median_seconds  # noqa: E402

STEPS, IMAGES, TEXT = 25, 4, (77, 384)  # CLIP-length captions of a 384-wide text encoder


def flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    runtime.configure()  # before any kernel is built
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    dtype = resolve_dtype("auto", "cpu")
    torch.manual_seed(0)
    states = torch.randn(2 * IMAGES, *TEXT, dtype=dtype)
    t = torch.tensor(500)
    vae = build_autoencoder("f4-small", 64).eval().to(dtype)
    latent_unet = build_unet("small", 16, TEXT[1]).eval().to(dtype)
    pixel_unet = build_unet("small", 64, TEXT[1], latent_channels=3).eval().to(dtype)
    z = torch.randn(2 * IMAGES, 4, 16, 16, dtype=dtype)
    x = torch.randn(2 * IMAGES, 3, 64, 64, dtype=dtype)

    latent_step = lambda: latent_unet(z, t, encoder_hidden_states=states)  # noqa: E731
    decode = lambda: vae.decode(z[:IMAGES])  # noqa: E731
    pixel_step = lambda: pixel_unet(x, t, encoder_hidden_states=states)  # noqa: E731
    res = {"dtype": str(dtype).replace("torch.", "")}
    res["latent_gflop_per_image"] = (STEPS * flops(latent_step) + flops(decode)) / IMAGES / 1e9
    res["pixel_gflop_per_image"] = STEPS * flops(pixel_step) / IMAGES / 1e9
    res["latent_s_per_image"] = (STEPS * median_seconds(latent_step, 10) + median_seconds(decode, 5)) / IMAGES
    res["pixel_s_per_image"] = STEPS * median_seconds(pixel_step, 3) / IMAGES
    res["flop_ratio"] = res["pixel_gflop_per_image"] / res["latent_gflop_per_image"]
    res["time_ratio"] = res["pixel_s_per_image"] / res["latent_s_per_image"]

    print(f"64x64 images, U-Net 'small' ({sum(p.numel() for p in latent_unet.parameters()) / 1e6:.1f}M), "
          f"{STEPS} steps with guidance, {IMAGES} images per batch, {res['dtype']}")  # fmt: skip
    print(f"{'':<34}{'GFLOP / image':>14}{'s / image':>11}")
    print(f"{'latent (4x16x16) + decode':<34}{res['latent_gflop_per_image']:>14.0f}{res['latent_s_per_image']:>11.2f}")
    print(f"{'pixel (3x64x64)':<34}{res['pixel_gflop_per_image']:>14.0f}{res['pixel_s_per_image']:>11.2f}")
    print(f"pixel / latent: {res['flop_ratio']:.1f}x the FLOPs, {res['time_ratio']:.1f}x the time")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
