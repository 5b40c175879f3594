"""Stable Diffusion XL folders: two CLIP text encoders, a pooled text embedding and the size and crop
micro-conditioning (SDXL paper, section 2.2), generated from as diffusers' ``StableDiffusionXLPipeline`` does.

    pipe = LatentDiffusionPipeline.from_pretrained("my-sdxl-folder")  # an SDXL folder opens as this class

The U-Net of an SDXL folder (``addition_embed_type: text_time``) takes, beside the caption states, ``text_embeds``
(the second encoder's pooled embedding, (B, P)) and ``time_ids`` (B, 6): the original image's (height, width), the
crop's (top, left) in the resized image, and the target (height, width). Training reads them per image from the data
pipeline (:func:`size_condition`); generation asks for an uncropped image of the size it makes, as diffusers does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from runtime.errors import InputError

from .pipeline import LatentDiffusionPipeline
from .text import TextEmbedding, XLTextEncoders, XLTokenizers, encode_text


def is_xl_unet(unet: UNet2DConditionModel) -> bool:
    """Whether the U-Net takes SDXL's pooled embedding and size/crop ``time_ids`` (``added_cond_kwargs``)."""
    return unet.config.addition_embed_type == "text_time"


def size_condition(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> list[int]:
    """SDXL's ``time_ids`` of one image: (original height, width, crop top, left, target height, width), the order
    diffusers' ``_get_add_time_ids`` and kohya's sd-scripts build them in."""
    return [*original, *crop_top_left, *target]


def added_cond(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The U-Net's ``added_cond_kwargs``: pooled (B, P), time_ids (B, 6) as given (float32 in training: bf16 would
    round a size of 1365 to 1368; the U-Net embeds them in float32 and casts the embedding itself)."""
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device)}


def check_xl_vae(vae: AutoencoderKL) -> str | None:
    """Why diffusers' SDXL pipeline would decode this autoencoder's latents differently from ours, or None: it divides
    by ``scaling_factor`` only (no ``shift_factor``), and a ``latents_mean`` / ``latents_std`` pair (Playground-style)
    is a normalisation this project does not apply."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None or getattr(config, "latents_std", None) is not None:
        return "the autoencoder normalises its latents by latents_mean / latents_std, which is not supported for SDXL folders"
    if getattr(config, "shift_factor", None):
        return (
            f"the autoencoder's latents have shift_factor {config.shift_factor}, which diffusers' SDXL pipeline ignores "
            "(it would decode them wrongly); give an autoencoder without one"
        )
    return None


def check_xl_unet(unet: UNet2DConditionModel, text_encoder: XLTextEncoders, vae: AutoencoderKL | None = None) -> str | None:
    """Why the U-Net's added embedding does not take 6 time ids and the second encoder's pooled embedding (or the
    autoencoder does not fit an SDXL folder: :func:`check_xl_vae`), or None."""
    if vae is not None and (why := check_xl_vae(vae)):
        return why
    wanted = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * 6 + text_encoder.config.projection_dim
    if wanted != given:
        return (
            f"the U-Net's added embedding takes {wanted} features, but 6 time ids of {unet.config.addition_time_embed_dim} "
            f"and the second text encoder's projection of {text_encoder.config.projection_dim} make {given}"
        )
    return None


class LatentDiffusionXLPipeline(StableDiffusionXLLoraLoaderMixin, LatentDiffusionPipeline):
    """:class:`LatentDiffusionPipeline` on a Stable Diffusion XL folder: the same call, samplers, img2img, LoRA scale and
    speed settings; prompts encoded by both text encoders, and an empty negative prompt as zeros where the folder says
    so (``force_zeros_for_empty_prompt``, as diffusers). ``load_lora_weights`` reads SDXL LoRA files (U-Net and both
    text encoders)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        text_encoder_2: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tokenizer_2: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        if why := check_xl_vae(vae):
            raise InputError(why)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @classmethod
    def of(cls, vae, text_encoders: XLTextEncoders, tokenizers: XLTokenizers, unet, scheduler) -> LatentDiffusionXLPipeline:
        """The pipeline of a training run's parts: the two encoders and tokenizers it trains as one."""
        return cls(
            vae=vae,
            text_encoder=text_encoders.text_encoder,
            text_encoder_2=text_encoders.text_encoder_2,
            tokenizer=tokenizers.tokenizer,
            tokenizer_2=tokenizers.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=text_encoders.force_zeros_for_empty_prompt,
        )

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder, self.text_encoder_2]

    def _encode(self, prompts: list[str], negatives: list[str] | None, unset_negatives: bool) -> TextEmbedding:
        """Both encoders' states (rows, 77, D1 + D2) and the pooled embeddings (rows, P), rows [negatives, prompts];
        unset negatives are zeros where the folder says so."""
        encoders = XLTextEncoders(self.text_encoder, self.text_encoder_2)
        tokenizers = XLTokenizers(self.tokenizer, self.tokenizer_2)
        text = encode_text(tokenizers, encoders, prompts)
        if negatives is None:
            return text
        if unset_negatives and self.config.force_zeros_for_empty_prompt:
            negative = TextEmbedding(torch.zeros_like(text.states), None, torch.zeros_like(text.pooled))
        else:
            negative = encode_text(tokenizers, encoders, negatives)
        return TextEmbedding(torch.cat([negative.states, text.states]), None, torch.cat([negative.pooled, text.pooled]))

    def _text_kwargs(self, text: TextEmbedding, per_prompt: int, size: tuple[int, int]) -> dict[str, Any]:
        """The states, and ``added_cond_kwargs``: the pooled embeddings and the time ids of an uncropped image of
        ``size`` (height, width), diffusers' defaults."""
        pooled = text.pooled.to(self.unet.dtype).repeat_interleave(per_prompt, dim=0)
        time_ids = torch.tensor([size_condition(size, (0, 0), size)] * len(pooled), device=pooled.device, dtype=pooled.dtype)
        return super()._text_kwargs(text, per_prompt, size) | {"added_cond_kwargs": added_cond(pooled, time_ids)}
