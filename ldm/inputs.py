"""What a user hands the pipeline, checked and turned into what it computes with: negative prompts,
init images (PIL, numpy or tensors in [0, 1]) for image-to-image."""

from __future__ import annotations

from typing import Union

import numpy as np
import PIL.Image
import torch

from runtime import bf16_narrow_refusal
from runtime.errors import InputError
from runtime.images import to_rgb

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, list]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def negative_prompts(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    """One negative prompt per prompt: "" for none, one string for all, or a list of ``n``."""
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    if len(negative_prompt) != n:
        raise InputError(
            f"negative_prompt has {len(negative_prompt)} entries for {n} prompts; give one per prompt or a single string"
        )
    return list(negative_prompt)


def image_tensor(image: ImageInput, num_prompts: int) -> torch.Tensor:
    """PIL image(s), numpy (H, W, 3) / (B, H, W, 3) or a tensor (3, H, W) / (B, 3, H, W), both in
    [0, 1] as the pipeline's own "np" / "pt" outputs -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, PIL.Image.Image) or (isinstance(image, list) and image and isinstance(image[0], PIL.Image.Image)):
        pils = [to_rgb(im) for im in (image if isinstance(image, list) else [image])]
        if len({im.size for im in pils}) > 1:
            raise InputError(f"image: all images must have the same size, got {sorted({im.size for im in pils})}")
        image = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in pils])
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise InputError(f"image: a numpy image must be (H, W, 3) or (B, H, W, 3) in [0, 1], got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise InputError(f"image: a tensor image must be (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] not in (1, num_prompts):
        raise InputError(f"image: batch of {image.shape[0]} images for {num_prompts} prompts; give 1 or {num_prompts}")
    image = image.float()
    if image.min() < -1e-3 or image.max() > 1 + 1e-3:
        raise InputError(f"image: expected values in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return image * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1], the autoencoder's range


def check_inputs(pipe, prompts, steps, height, width, per_prompt, output_type, strength, generator, batch) -> None:
    """A pipeline call's inputs, each refused in one line naming it and what would be valid, before any work."""
    if not prompts:
        raise InputError("prompt: the list of prompts is empty")
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt: expected a string or a list of strings")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if per_prompt < 1:
        raise InputError(f"num_images_per_prompt must be >= 1, got {per_prompt}")
    f = pipe.downsampling
    for name, size in (("height", height), ("width", width)):
        if size % f != 0 or size <= 0:
            raise InputError(
                f"{name}={size} is not divisible by {f} (autoencoder x{pipe.vae_scale_factor} times U-Net "
                f"x{f // pipe.vae_scale_factor}); nearest valid: {max(f, round(size / f) * f)}"
            )
    if pipe.unet.dtype == torch.bfloat16 and pipe._execution_device.type == "cpu":
        refusal = bf16_narrow_refusal([(height, width)], f, "the U-Net", ", or fp32 (dtype='fp32', --dtype fp32)")
        if refusal:
            raise InputError(refusal)
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
    if isinstance(generator, list) and len(generator) != batch:
        raise InputError(f"generator: {len(generator)} generators for {batch} images; give one or one per image")
