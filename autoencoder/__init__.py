"""Stage 1: the autoencoder that maps images to a smooth latent space and back."""

from .model import (
    AUTOENCODER_PRESETS,
    build_autoencoder,
    denormalize_latents,
    downsampling_factor,
    fit_latent_normalization,
    load_autoencoder,
    normalize_latents,
    save_autoencoder,
    set_latent_normalization,
)

__all__ = [
    "AUTOENCODER_PRESETS",
    "build_autoencoder",
    "denormalize_latents",
    "downsampling_factor",
    "fit_latent_normalization",
    "load_autoencoder",
    "normalize_latents",
    "save_autoencoder",
    "set_latent_normalization",
]
