"""The latent denoiser: diffusers' UNet2DConditionModel in a few explicit sizes."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from runtime.errors import InputError

# tiny, base, small: cross-attention in every block but the deepest down block and its mirror, as in
# Stable Diffusion; coarse-attn: the other way round. `attention_head_dim` is, for historical reasons
# in diffusers, the number of heads.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # tests: ~0.9M parameters
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    "base": dict(  # ~18.5M parameters with a 384-wide text encoder: the default for 8x8 latents before "coarse-attn"
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
    ),
    "small": dict(  # ~35M parameters with a 384-wide text encoder
        block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
    ),
    # The default for 8x8 latents (~17.2M parameters): cross-attention at the 4x4 and 2x2 levels and in the mid block,
    # none at 8x8, one ResNet (and transformer) per block. A step of "base" spends most of its time at 8x8, where a token
    # costs 4x and 16x what it does at 4x4 and 2x2: this one runs 1.7x the images a second, and at equal wall-clock
    # scores top-1 0.95 against 0.86 (issue 26, benchmarks/RESULTS.md "U-Net shape")
    "coarse-attn": dict(
        block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
    ),
    # "coarse-attn" with cross-attention at 8x8 too (one ResNet and transformer per block): whether the caption reaching
    # the finest level is what draws the one-image captions ("sun", "rocket"; issue 26, RESULTS.md "U-Net shape, 8x8")
    "all-attn": dict(
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
    ),
    # "coarse-attn" with two ResNets (and transformers) per block, as "base" has: whether depth, not the 8x8 attention,
    # is what drew the one-image captions in "base" (issue 26, RESULTS.md "U-Net shape, 2 layers a block")
    "coarse-attn-2": dict(
        block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
    ),
}


def build_unet(preset: str, sample_size: int, cross_attention_dim: int, latent_channels: int = 4) -> UNet2DConditionModel:
    """A freshly initialised U-Net for ``sample_size`` x ``sample_size`` latents."""
    if preset not in UNET_PRESETS:
        raise InputError(f"unknown U-Net preset '{preset}'; valid: {', '.join(UNET_PRESETS)}")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=cross_attention_dim,
        **UNET_PRESETS[preset],
    )


def unet_downsampling(unet: UNet2DConditionModel) -> int:
    """How many times the U-Net halves its input: every down block but the last downsamples."""
    return 2 ** (len(unet.config.block_out_channels) - 1)
