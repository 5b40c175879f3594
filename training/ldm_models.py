"""The models of a stage-2 run: a new U-Net on a stage-1 autoencoder and a text encoder, or every
component of a pipeline folder to fine-tune; and the checks that they fit together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

from autoencoder import downsampling_factor, load_autoencoder
from ldm.diffusion import training_scheduler
from ldm.text import load_text_encoder
from ldm.unet import build_unet, unet_downsampling
from training.config import ConfigError
from training.ldm_config import LdmJobConfig, text_encoder_trains


@dataclass
class Models:
    vae: Any
    tokenizer: Any
    text_encoder: Any
    text_trains: bool
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    vae_dir: str
    text_encoder_dir: str | None  # what the text cache is keyed on (None: the encoder trains)
    source: str | None  # the init_from pipeline folder


def load_models(cfg: LdmJobConfig) -> Models:
    """Fresh U-Net on a stage-1 autoencoder, or every component of an existing pipeline folder
    (``model.init_from``) as it is: its scheduler config gives the schedule and prediction type,
    its vae config the scaling factor."""
    m = cfg.model
    trains = text_encoder_trains(cfg)
    if m.init_from:
        root = Path(m.init_from)
        vae_dir = Path(m.replace_vae) if m.replace_vae else root / "vae"
        vae = load_autoencoder(vae_dir)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = AutoModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"))
        return Models(vae.eval().requires_grad_(False), tokenizer, text_encoder, trains, unet, noise_scheduler, str(vae_dir),
                      None if trains else str(root / "text_encoder"), str(root))  # fmt: skip
    vae = load_autoencoder(m.vae).eval().requires_grad_(False)
    tokenizer, text_encoder, encoder_dir = load_text_encoder(m.text_encoder, m.clip_preset)
    unet = build_unet(m.unet, cfg.data.resolution // downsampling_factor(vae), text_encoder.config.hidden_size, vae.config.latent_channels)
    noise_scheduler = training_scheduler(m.prediction_type, cfg.objective.zero_terminal_snr)
    return Models(vae, tokenizer, text_encoder, trains, unet, noise_scheduler, m.vae, encoder_dir, None)


def check_compatible(unet, vae, text_encoder, resolution: int, vae_path: str) -> None:
    """The errors that would otherwise surface as a shape mismatch deep inside the first step."""
    latent_channels = vae.config.latent_channels
    if unet.config.in_channels != latent_channels:
        raise ConfigError(f"the U-Net takes {unet.config.in_channels} input channels but the autoencoder {vae_path} "
                         f"makes {latent_channels}-channel latents")  # fmt: skip
    hidden = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise ConfigError(f"the U-Net's cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder's "
                         f"hidden size is {hidden}")  # fmt: skip
    f = downsampling_factor(vae)
    total = f * unet_downsampling(unet)
    if resolution % total:
        raise ConfigError(f"data.resolution={resolution} is not divisible by {total} (autoencoder x{f} times U-Net "
                         f"x{total // f}); valid: multiples of {total}, e.g. {max(total, resolution // total * total)}")  # fmt: skip
