"""ldm/unet.py: the U-Net presets, their downsampling, and a bad preset named."""

from __future__ import annotations

import pytest
import torch

from ldm.unet import UNET_PRESETS, build_unet, unet_downsampling
from runtime.errors import InputError


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_each_preset_maps_latents_to_latents_and_halves_once_per_level_but_the_last(preset):
    unet = build_unet(preset, 8, cross_attention_dim=32, latent_channels=4)
    levels = len(unet.config.block_out_channels)
    assert unet_downsampling(unet) == 2 ** (levels - 1)
    if preset == "tiny":  # the others are too slow to run here; their shapes follow from the same config
        x = torch.randn(2, 4, 8, 8)
        out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 5, 32)).sample
        assert out.shape == x.shape


def test_an_unknown_preset_is_named_with_the_valid_ones():
    with pytest.raises(InputError, match="unknown U-Net preset 'huge'; valid: " + ", ".join(UNET_PRESETS)):
        build_unet("huge", 8, 32)
