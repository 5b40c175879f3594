"""The models of a stage-2 run: a new U-Net on a stage-1 autoencoder and a text encoder, or every
component of a pipeline folder to fine-tune; and the checks that they fit together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
import transformers
from transformers import AutoModel, AutoTokenizer

from autoencoder import downsampling_factor, load_autoencoder
from ldm.diffusion import training_scheduler, training_scheduler_of
from ldm.flow import flow_scheduler, sample_sigmas
from ldm.objective import DenoisingObjective, FlowObjective
from ldm.schedulers import flow_shift, is_flow
from ldm.folders import is_xl_index
from ldm.sdxl import check_xl_unet, is_xl_unet
from ldm.text import XLTextEncoders, XLTokenizers, load_text_encoder
from ldm.pipeline import total_downsampling
from ldm.unet import build_unet
from training.config import ConfigError
from training.ldm_config import FinetuneConfig, LdmJobConfig, text_encoder_trains, with_objective
from training.stage2.finetune import add_lora


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
    cache_text: bool = (
        False  # the frozen text encoder's caption states go into the latent cache (cache.text, and it does not train)
    )
    text_encoder_2_dir: str | None = None  # Stable Diffusion XL's second encoder, what the text cache is keyed on too

    @property
    def text_encoder_dirs(self) -> list[str]:
        return [d for d in (self.text_encoder_dir, self.text_encoder_2_dir) if d is not None]

    @property
    def xl(self) -> bool:
        """A Stable Diffusion XL U-Net: it takes the pooled caption embedding and each image's size and crop too."""
        return is_xl_unet(self.unet)

    @property
    def downsampling(self) -> int:
        """Pixels per latent pixel at the U-Net's coarsest level: the autoencoder's factor x the U-Net's."""
        return total_downsampling(self.vae, self.unet)


def load_models(cfg: LdmJobConfig) -> Models:
    """Fresh U-Net on a stage-1 autoencoder, or every component of an existing pipeline folder
    (``model.init_from``) as it is: its scheduler config gives the schedule and prediction type,
    its vae config the scaling factor."""
    m = cfg.model
    text_trains = text_encoder_trains(cfg)
    if m.init_from:
        root = Path(m.init_from)
        vae_dir = Path(m.replace_vae) if m.replace_vae else root / "vae"
        vae = load_autoencoder(vae_dir)
        tokenizer, text_encoder, second = folder_text(root)  # second: Stable Diffusion XL's second encoder's folder
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        noise_scheduler = training_scheduler_of(root / "scheduler")
        return Models(
            vae.eval().requires_grad_(False),
            tokenizer,
            text_encoder,
            text_trains,
            unet,
            noise_scheduler,
            str(vae_dir),
            None if text_trains else str(root / "text_encoder"),
            str(root),
            caches_text(cfg, text_trains),
            None if text_trains else second,
        )
    vae = load_autoencoder(m.vae).eval().requires_grad_(False)
    tokenizer, text_encoder, encoder_dir = load_text_encoder(m.text_encoder, m.clip_preset)
    unet = build_unet(
        m.unet, cfg.data.resolution // downsampling_factor(vae), text_encoder.config.hidden_size, vae.config.latent_channels
    )
    if cfg.objective.type == "flow":
        noise_scheduler = flow_scheduler(cfg.objective.shift)
    else:
        noise_scheduler = training_scheduler(m.prediction_type, cfg.objective.zero_terminal_snr)
    return Models(
        vae,
        tokenizer,
        text_encoder,
        text_trains,
        unet,
        noise_scheduler,
        m.vae,
        encoder_dir,
        None,
        caches_text(cfg, text_trains),
    )


def folder_text(root: Path) -> tuple:
    """(tokenizer, text encoder, second encoder's folder or None) of a pipeline folder: its one, or Stable Diffusion XL's
    two as one (:class:`ldm.text.XLTextEncoders`), each of the transformers class its model_index.json names (checked to
    be a transformers class by ``check_pipeline_folder``)."""
    index = json.loads((root / "model_index.json").read_text())
    # float32 as the U-Net and autoencoder load, whatever the files hold: transformers keeps a file's fp16 (most SD
    # folders), which a trained encoder cannot step in, and autocast (bf16) decides the compute precision, not the file
    fp32 = {"use_safetensors": True, "dtype": torch.float32}
    if not is_xl_index(index):
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        return tokenizer, AutoModel.from_pretrained(root / "text_encoder", **fp32), None
    tokenizers = [AutoTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [
        getattr(transformers, index[name][1]).from_pretrained(root / name, **fp32) for name in ("text_encoder", "text_encoder_2")
    ]
    encoder = XLTextEncoders(*encoders, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    return XLTokenizers(*tokenizers), encoder, str(root / "text_encoder_2")


def caches_text(cfg: LdmJobConfig, text_trains: bool) -> bool:
    """Whether the caption states go into the latent cache: cache.text, for a frozen encoder, and captions whose text is
    one of their variants (shuffled or dropped tags change it every step: those are encoded each step)."""
    return cfg.cache.text and not text_trains and not cfg.captions.per_step


def resolve_objective(cfg: LdmJobConfig) -> LdmJobConfig:
    """``cfg`` with its objective's type and shift set before anything is built: a fine-tune's are its folder's (the
    scheduler/ it was trained with), and an explicit other value is one line; a new U-Net's unset ones ddpm and 1.0."""
    if not cfg.model.init_from:
        return with_objective(cfg)
    config = training_scheduler_of(Path(cfg.model.init_from) / "scheduler").config
    kind = "flow" if is_flow(config) else "ddpm"
    return with_objective(cfg, kind, flow_shift(config) if kind == "flow" else None, cfg.model.init_from)


def training_objective(cfg: LdmJobConfig, models: Models):
    """(the loss, ``sigmas(n, generator)`` or None): DDPM's on the model's schedule, or flow matching's with its
    noise levels drawn as ``objective.timesteps`` says and shifted by the model's shift."""
    o = cfg.objective
    if o.type == "flow":
        shift = flow_shift(models.noise_scheduler.config)
        return FlowObjective(o.weighting, o.offset_noise), lambda n, g: sample_sigmas(
            n, g, o.timesteps, o.logit_mean, o.logit_std, o.mode_scale, shift
        )
    return DenoisingObjective(models.noise_scheduler, o.min_snr_gamma, o.offset_noise), None


def prepare_to_train(models: Models, finetune: FinetuneConfig, device) -> None:
    """The text encoder on ``device``, in training mode when it trains; for LoRA, peft adapters on the attention
    projections (the base weights frozen), else the text encoder's weights train or not as a whole."""
    models.text_encoder.to(device).train(models.text_trains)
    if finetune.method == "lora":
        add_lora(models.unet, models.text_encoder, finetune, models.text_trains)
    else:
        models.text_encoder.requires_grad_(models.text_trains)
        for unused in models.text_encoder.unused_modules() if models.xl else []:
            unused.requires_grad_(False)


def check_compatible(unet, vae, text_encoder, resolution: int, vae_path: str) -> None:
    """The errors that would otherwise surface as a shape mismatch deep inside the first step."""
    latent_channels = vae.config.latent_channels
    if unet.config.in_channels != latent_channels:
        raise ConfigError(
            f"the U-Net takes {unet.config.in_channels} input channels but the autoencoder {vae_path} "
            f"makes {latent_channels}-channel latents"
        )
    hidden = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise ConfigError(
            f"the U-Net's cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder's hidden size is {hidden}"
        )
    if is_xl_unet(unet) != isinstance(text_encoder, XLTextEncoders):
        raise ConfigError(
            "the U-Net takes Stable Diffusion XL's pooled embedding and size conditioning but the folder has one text encoder"
            if is_xl_unet(unet)
            else "the folder has Stable Diffusion XL's two text encoders but its U-Net takes no pooled embedding"
        )
    if is_xl_unet(unet) and (why := check_xl_unet(unet, text_encoder, vae)):
        raise ConfigError(why)
    f, total = downsampling_factor(vae), total_downsampling(vae, unet)
    if resolution % total:
        raise ConfigError(
            f"data.resolution={resolution} is not divisible by {total} (autoencoder x{f} times U-Net "
            f"x{total // f}); valid: multiples of {total}, e.g. {max(total, resolution // total * total)}"
        )
