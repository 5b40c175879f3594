"""Build, load and save the first-stage autoencoder (diffusers ``AutoencoderKL``).

This module owns latent normalisation: the fitted ``scaling_factor`` (and optional
``shift_factor``) live in the saved ``vae/config.json`` and nowhere else. Every other part of
the project goes through :func:`normalize_latents` / :func:`denormalize_latents`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL

from runtime.files import atomic_dir

# Small explicit presets. f = 2 ** (len(block_out_channels) - 1) is the spatial downsampling.
AUTOENCODER_PRESETS: dict[str, dict] = {
    # tests: f=4, 0.2M parameters
    "tiny": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    # the default for 32x32 / 64x64 data on a CPU: f=4, 2.9M parameters. The full-resolution
    # level is kept at 64 channels: it dominates the cost (measured: (64,128,128) is 1.4x slower)
    "f4-small": dict(block_out_channels=(64, 64, 128), layers_per_block=1, norm_num_groups=32, latent_channels=4),
    # the latent-diffusion paper's KL-f4 shape (4 latent channels instead of 3)
    "f4": dict(block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4),
    # f=4 with 32 channels at full resolution: its forward+backward is ~1.4x cheaper than f4-small
    "f4-narrow": dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32, latent_channels=4),
    # f=8 for 64x64+ images on a CPU
    "f8-small": dict(block_out_channels=(64, 64, 128, 128), layers_per_block=1, norm_num_groups=32, latent_channels=4),
    # Stable Diffusion's KL-f8 shape
    "f8": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4),
}


def build_autoencoder(preset: str, resolution: int, **overrides) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` from a named preset; ``overrides`` (e.g.
    ``latent_channels=8``) replace the preset's values."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"model.preset='{preset}' is unknown; valid presets: {', '.join(AUTOENCODER_PRESETS)}")
    spec = dict(AUTOENCODER_PRESETS[preset]) | {k: v for k, v in overrides.items() if v is not None}
    if min(spec["block_out_channels"]) % spec["norm_num_groups"]:
        raise ValueError(f"model.norm_num_groups={spec['norm_num_groups']} does not divide the preset's channel widths {spec['block_out_channels']}")
    n = len(spec["block_out_channels"])
    factor = 2 ** (n - 1)
    if resolution % factor:
        raise ValueError(f"data.resolution={resolution} is not divisible by the preset '{preset}' downsampling factor {factor}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=resolution,
        **spec,
    )


def downsampling_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load a saved ``vae/`` folder, with a clear error if the folder is not an autoencoder."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"'{path}' is not an autoencoder folder: it has no config.json (expected the vae/ folder of a run or a pipeline)")
    name = json.loads(config.read_text()).get("_class_name")
    if name != "AutoencoderKL":
        raise ValueError(f"'{path}' holds a {name or 'unknown model'}, not an AutoencoderKL")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def save_autoencoder(vae: AutoencoderKL, path: str | Path) -> Path:
    """Save in the diffusers layout (config.json + safetensors), replacing ``path`` atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return path


# ---- latent normalisation -------------------------------------------------------------------


def normalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Raw posterior sample -> the unit-variance latent a diffusion model sees."""
    shift = vae.config.get("shift_factor") or 0.0
    return (z - shift) * vae.config.scaling_factor


def denormalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    shift = vae.config.get("shift_factor") or 0.0
    return z / vae.config.scaling_factor + shift


@torch.no_grad()
def fit_latent_normalization(
    vae: AutoencoderKL, batches: Iterable[torch.Tensor], fit_shift: bool = False
) -> tuple[float, float | None]:
    """Fit ``scaling_factor`` (and ``shift_factor`` if asked) over posterior samples.

    As for Stable Diffusion: ``scaling_factor = 1 / std(z)``, so normalised latents have unit
    standard deviation. Without a shift, the std is taken about zero-centred data the way
    SD did (torch.std subtracts the mean) and the mean is assumed near 0; with ``fit_shift``
    the mean is removed explicitly (the SD3 / FLUX convention).
    Streaming sums in float64, so any number of batches fits in memory.
    """
    n, s1, s2 = 0, 0.0, 0.0
    for x in batches:
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample().double()  # (B, C, h, w)
        n += z.numel()
        s1 += z.sum().item()
        s2 += (z * z).sum().item()
    if n == 0:
        raise ValueError("no batches to fit the latent scale on")
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return 1.0 / std, (mean if fit_shift else None)


def set_latent_normalization(vae: AutoencoderKL, scale: float, shift: float | None) -> None:
    vae.register_to_config(scaling_factor=float(scale), shift_factor=None if shift is None else float(shift))
