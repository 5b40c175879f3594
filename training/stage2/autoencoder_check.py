"""Before stage 2 trains: can the frozen autoencoder represent the user's images at all?"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from autoencoder.metrics import autoencoder_code, compare_codes
from training.eval.autoencoder import latent_values, load_images, reference_codes


def check_autoencoder_fit(vae, records, cfg, vae_dir: str) -> dict:
    """(Stage 2, ``cfg`` an LdmJobConfig.) Reconstruct ``model.check_images`` of the training images through the frozen autoencoder and
    through plain bicubic resizing to as many numbers as its latent holds. A U-Net can only learn
    what the autoencoder can represent: if it is worse than resizing, warn with both figures and
    the command that fine-tunes the autoencoder on these images. Returns the figures (for log.jsonl)."""
    images = load_images(records, replace(cfg.data, random_flip=False), cfg.model.check_images)
    n = latent_values(vae, cfg.data.resolution)
    bicubic_name, bicubic = next(iter(reference_codes(n, None).items()))
    with torch.no_grad():
        figures = compare_codes({"vae": autoencoder_code(vae), bicubic_name: bicubic}, images.split(64), lpips=None)
    ours, ref = figures["vae"], figures[bicubic_name]
    fit = {
        "images": ours["num_images"],
        "latent_values": n,
        "vae_psnr": round(ours["psnr"], 2),
        "vae_colour_error": round(ours["colour_error"], 2),
        "reference": bicubic_name,
        "reference_psnr": round(ref["psnr"], 2),
        "reference_colour_error": round(ref["colour_error"], 2),
    }
    fit["worse_than_reference"] = ours["psnr"] < ref["psnr"]
    print(
        f"autoencoder check on {fit['images']} of your images: {vae_dir} PSNR {fit['vae_psnr']} dB, colour error "
        f"{fit['vae_colour_error']} (0-255 levels); bicubic to the latent's {n} values: {fit['reference_psnr']} dB, "
        f"colour error {fit['reference_colour_error']}"
    )
    if fit["worse_than_reference"]:
        name = Path(cfg.output_dir).name
        swap = (
            f"model.replace_vae=runs/{name}-autoencoder/vae" if cfg.model.init_from else f"model.vae=runs/{name}-autoencoder/vae"
        )
        print(
            f"warning: the autoencoder {vae_dir} reconstructs your images worse than plain resizing to its latent size "
            f"({fit['vae_psnr']} vs {fit['reference_psnr']} dB): it cannot represent them, and no U-Net training fixes that. "
            f"Fine-tune the autoencoder (encoder and decoder) on these images first:\n"
            f"  accelerate launch -m training.train_autoencoder --config configs/autoencoder/finetune.yaml "
            f"model.init_from={vae_dir} data.path={cfg.data.path} data.resolution={cfg.data.resolution} "
            f"output_dir=runs/{name}-autoencoder\n"
            f"then run this job again with {swap}"
        )
    return fit
