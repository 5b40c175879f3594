"""Fine-tuning a trained pipeline: LoRA adapters on its U-Net (and text encoder) with peft, and
their export in the format diffusers' ``load_lora_weights`` reads, beside the pipeline with the
adapters fused in."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import folder_scheduler
from training.ldm_config import FinetuneConfig


def add_lora(unet, text_encoder, ft: FinetuneConfig, text_trains: bool) -> None:
    """Freeze the base weights and put adapters on the attention projections: the U-Net's, and the
    text encoder's when it trains."""

    def adapters(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian", target_modules=list(targets))

    unet.requires_grad_(False)
    unet.add_adapter(adapters(ft.lora_target_modules))
    if text_trains:
        text_encoder.requires_grad_(False)
        add_text_lora(text_encoder, adapters(ft.text_lora_target_modules))


def add_text_lora(text_encoder, config: LoraConfig) -> None:
    """LoRA adapters on a transformers text encoder, with peft itself: transformers 5's
    ``add_adapter`` wants a peft release newer than the registries may have (0.22). Recorded in
    ``peft_config`` as ``add_adapter`` does, so peft's state-dict helpers find the adapter."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}


def export_lora(unet, text_encoder, folder: Path, convert: bool = True) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in the format diffusers' ``load_lora_weights`` reads: with
    ``convert``, the U-Net's keys renamed as diffusers' DreamBooth-LoRA script saves them (``lora.down`` / ``lora.up``,
    for adapters on the attention projections); without, peft's own names (``lora_A`` / ``lora_B``), as diffusers'
    LCM-LoRA script saves adapters on convolutions too: the renaming covers only the attention projections, and a file
    that mixes both namings loses the renamed ones on loading."""
    unet_layers = get_peft_model_state_dict(unet)
    unet_layers = convert_state_dict_to_diffusers(unet_layers) if convert else unet_layers
    text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if text_encoder is not None else None
    LatentDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors"


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
