"""Stage 1: the autoencoder that maps images to a smooth latent space and back."""

from .latents import (
    denormalize_latents,
    downsampling_factor,
    encode_latents,
    encode_moments,
    fit_latent_normalization,
    latent_normalization,
    normalize_latents,
    sample_latents,
    set_latent_normalization,
)
from .model import AUTOENCODER_PRESETS, build_autoencoder, load_autoencoder, save_autoencoder

__all__ = [
    "AUTOENCODER_PRESETS",
    "build_autoencoder",
    "denormalize_latents",
    "downsampling_factor",
    "encode_latents",
    "encode_moments",
    "fit_latent_normalization",
    "latent_normalization",
    "load_autoencoder",
    "normalize_latents",
    "sample_latents",
    "save_autoencoder",
    "set_latent_normalization",
]
