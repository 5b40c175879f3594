"""How much PSNR can a latent of a given size carry? Non-learned reference points.

    .venv/bin/python benchmarks/autoencoder_ceiling.py [--data data/openmoji-32]

For the held-out split: PSNR of (a) area-downsampling to k x k x 3 and bicubic upsampling back,
and (b) PCA fitted on the train split with as many components as a latent has values
(4x8x8 = 256 for the default f=4 autoencoder at 32x32). PCA is the best *linear* code of that
size; a trained autoencoder's PSNR is to be read against it.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import runtime
from autoencoder.metrics import psnr
from training.data.records import DataConfig, load_records
from training.data.loader import eval_loader


def load(path: str, split: str, resolution: int) -> torch.Tensor:
    cfg = DataConfig(path=path, resolution=resolution)
    return torch.cat([b["pixel_values"] for b in eval_loader(load_records(path, cfg, split), cfg, 512)])


def main() -> None:
    runtime.configure()  # before any kernel is built
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/openmoji-32")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    train, test = load(args.data, "train", args.resolution), load(args.data, "test", args.resolution)
    target = (test + 1) / 2
    results: dict[str, float] = {}
    for k in (8, 16):
        r = F.interpolate(F.interpolate(test, size=k, mode="area"), size=args.resolution, mode="bicubic").clamp(-1, 1)
        results[f"bicubic_{k}x{k}x3_{k * k * 3}_values"] = psnr(target, (r + 1) / 2).mean().item()
    X = train.flatten(1).double()
    mean = X.mean(0)
    _, _, V = torch.linalg.svd(X - mean, full_matrices=False)  # (D, D) principal directions
    for n in (256, 512, 768):
        P = V[:n]
        r = ((test.flatten(1).double() - mean) @ P.T @ P + mean).float().clamp(-1, 1).view_as(test)
        results[f"pca_{n}_values"] = psnr(target, (r + 1) / 2).mean().item()
    print(json.dumps({"data": args.data, "train_images": len(train), "test_images": len(test),
                      "held_out_psnr_db": {k: round(v, 2) for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
