"""Fine-tuning a trained pipeline: LoRA adapters on its U-Net (and text encoder) with peft, and
their export in the format diffusers' ``load_lora_weights`` reads and in kohya's key layout, beside the
pipeline with the adapters fused in."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from ldm.pipeline import LatentDiffusionPipeline
from ldm.sdxl import LatentDiffusionXLPipeline
from ldm.text import XLTextEncoders
from ldm.schedulers import folder_scheduler
from training.ldm_config import FinetuneConfig


def add_lora(unet, text_encoder, ft: FinetuneConfig, text_trains: bool) -> None:
    """Freeze the base weights and put adapters on the attention projections: the U-Net's, and the
    text encoder's when it trains."""

    def adapters(targets: list[str], layers: list[int] | None = None) -> LoraConfig:
        return LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian", target_modules=list(targets),
                          layers_to_transform=layers, layers_pattern="layers" if layers else None)  # fmt: skip

    unet.requires_grad_(False)
    unet.add_adapter(adapters(ft.lora_target_modules))
    if text_trains:
        text_encoder.requires_grad_(False)
        for k, encoder in enumerate(text_encoders(text_encoder)):  # Stable Diffusion XL's two: adapters on each, and
            # none on the first's last layer, which its penultimate states SDXL takes never pass through
            n = encoder.config.num_hidden_layers
            layers = list(range(n - 1)) if k == 0 and isinstance(text_encoder, XLTextEncoders) else None
            add_text_lora(encoder, adapters(ft.text_lora_target_modules, layers))


def text_encoders(text_encoder) -> list:
    """The transformers models of a run's text encoder: it, or Stable Diffusion XL's two."""
    if isinstance(text_encoder, XLTextEncoders):
        return [text_encoder.text_encoder, text_encoder.text_encoder_2]
    return [text_encoder]


def add_text_lora(text_encoder, config: LoraConfig) -> None:
    """LoRA adapters on a transformers text encoder, with peft itself: transformers 5's
    ``add_adapter`` wants a peft release newer than the registries may have (0.22). Recorded in
    ``peft_config`` as ``add_adapter`` does, so peft's state-dict helpers find the adapter."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}


def export_lora(unet, text_encoder, folder: Path, convert: bool = True, xl: bool = False) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in the format diffusers' ``load_lora_weights`` reads: with
    ``convert``, the U-Net's keys renamed as diffusers' DreamBooth-LoRA script saves them (``lora.down`` / ``lora.up``,
    for adapters on the attention projections); without, peft's own names (``lora_A`` / ``lora_B``), as diffusers'
    LCM-LoRA script saves adapters on convolutions too: the renaming covers only the attention projections, and a file
    that mixes both namings loses the renamed ones on loading."""
    unet_layers = get_peft_model_state_dict(unet)
    unet_layers = convert_state_dict_to_diffusers(unet_layers) if convert else unet_layers
    if xl:  # Stable Diffusion XL: two text encoders
        return _export_xl_lora(unet, unet_layers, text_encoder, folder)
    text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if text_encoder is not None else None
    LatentDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        safe_serialization=True,
        # the adapters' config (lora_alpha above all) in the file's metadata: without it a loader takes alpha = rank,
        # a scale of 1, and a run with lora_alpha 4 at rank 8 came back at twice its trained strength
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


def _export_xl_lora(unet, unet_layers: dict, encoders: XLTextEncoders | None, folder: Path) -> Path:
    """A Stable Diffusion XL LoRA file: the U-Net's adapters and, when they train, each text encoder's under its own
    prefix (``text_encoder.``, ``text_encoder_2.``), what ``StableDiffusionXLPipeline.load_lora_weights`` reads."""
    text = {"text_encoder": None, "text_encoder_2": None}
    metadata = {}
    if encoders is not None:
        for name, encoder in zip(text, text_encoders(encoders), strict=True):
            text[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
            metadata[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    LatentDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text["text_encoder"],
        text_encoder_2_lora_layers=text["text_encoder_2"],
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        **metadata,
    )
    return folder / "pytorch_lora_weights.safetensors"


KOHYA_FILE = "lora_kohya.safetensors"


def export_lora_kohya(unet, text_encoder, folder: Path, alpha: float) -> Path:
    """``folder/lora_kohya.safetensors``: the same adapters in kohya's key layout for a Stable Diffusion 1.x-layout
    model, what AUTOMATIC1111, ComfyUI and sd-scripts load: ``lora_unet_<diffusers module, dots as _>.lora_down.weight``
    with its ``.alpha``, and ``lora_te_text_model_encoder_layers_<n>_self_attn_q_proj...`` for the CLIP text encoder
    (sd-scripts' prefix for a one-encoder model; ComfyUI and A1111 look the text encoder's adapters up by exactly these
    names, and drop others silently). diffusers' converter writes each alpha as the rank (a scale of 1); the adapters
    here scale by lora_alpha / rank, so ``alpha`` (``finetune.lora_alpha``) replaces it."""
    layers = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None:  # transformers 5's CLIPTextModel names its modules without CLIP's text_model. level
        clip = text_encoder.config.model_type == "clip_text_model"
        layers |= {
            f"text_encoder.{'text_model.' + k if clip and not k.startswith('text_model.') else k}": v
            for k, v in get_peft_model_state_dict(text_encoder).items()
        }
    # diffusers names the first text encoder lora_te1 (SDXL's); a one-encoder model's is lora_te
    kohya = {re.sub(r"^lora_te1_", "lora_te_", k): v for k, v in convert_state_dict_to_kohya(layers).items()}
    kohya = {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.detach().contiguous() for k, v in kohya.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(folder / KOHYA_FILE), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)})
    return folder / KOHYA_FILE


def fused_lora_pipeline(source: str, lora_folder: Path, vae=None, noise_scheduler_config=None) -> LatentDiffusionPipeline:
    """The ``source`` pipeline with the adapters of ``lora_folder`` fused into its weights (loaded
    back through diffusers' own LoRA loader, so the export is what users' ``load_lora_weights``
    gives); ``vae`` replaces its autoencoder (model.replace_vae); DPM++ on the training schedule."""
    pipe = LatentDiffusionPipeline.from_pretrained(source, dtype="fp32")
    if vae is not None:
        pipe.vae = vae
    pipe.load_lora_weights(str(lora_folder))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.scheduler = folder_scheduler(noise_scheduler_config or pipe.scheduler.config)
    return pipe
