"""Build, load and save the first-stage autoencoder (diffusers ``AutoencoderKL``). What its
latents mean (moments, scale, shift, downsampling) is :mod:`autoencoder.latents`."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL

from runtime.errors import InputError
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
        raise InputError(f"model.preset='{preset}' is unknown; valid presets: {', '.join(AUTOENCODER_PRESETS)}")
    spec = dict(AUTOENCODER_PRESETS[preset]) | {k: v for k, v in overrides.items() if v is not None}
    if min(spec["block_out_channels"]) % spec["norm_num_groups"]:
        raise InputError(
            f"model.norm_num_groups={spec['norm_num_groups']} does not divide the preset's channel widths {spec['block_out_channels']}"
        )
    n = len(spec["block_out_channels"])
    factor = 2 ** (n - 1)
    if resolution % factor:
        raise InputError(f"data.resolution={resolution} is not divisible by the preset '{preset}' downsampling factor {factor}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=resolution,
        **spec,
    )


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load a saved ``vae/`` folder, with a clear error if the folder is not an autoencoder."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise InputError(
            f"'{path}' is not an autoencoder folder: it has no config.json (expected the vae/ folder of a run or a pipeline)"
        )
    name = json.loads(config.read_text()).get("_class_name")
    if name != "AutoencoderKL":
        raise InputError(f"'{path}' holds a {name or 'unknown model'}, not an AutoencoderKL")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def save_autoencoder(vae: AutoencoderKL, path: str | Path) -> Path:
    """Save in the diffusers layout (config.json + safetensors), replacing ``path`` atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return path
