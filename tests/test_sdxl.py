"""Stable Diffusion XL folders: generation as diffusers' SDXL pipeline, the size/crop conditioning of bucketed images,
full and LoRA fine-tuning, exact resume, and exports diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_sdxl_folder
from diffusers import StableDiffusionXLPipeline

from ldm import LatentDiffusionPipeline
from ldm.sdxl import LatentDiffusionXLPipeline

PROMPTS = ["a red apple", "sun"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny random SDXL folder, as diffusers writes one."""
    return tiny_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def images(pipe, negative=None, **kw) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images  # fmt: skip


def test_an_sdxl_folder_opens_as_the_xl_pipeline_and_draws_what_diffusers_draws(sdxl):
    ours = LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32")
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False)
    assert isinstance(ours, LatentDiffusionXLPipeline)
    for negative in (None, "", "blurry"):  # None: zeros (force_zeros_for_empty_prompt), "": the empty prompt encoded
        a, b = images(ours, negative), images(theirs, negative)
        assert a.shape == (2, 32, 32, 3) and np.abs(a - b).max() < 1e-4, negative
    assert np.abs(images(ours, None) - images(ours, "")).max() > 1e-3  # the zeros are not the encoded empty prompt
    wide = dict(height=32, width=48)  # the time ids follow the size asked for
    assert np.abs(images(ours, **wide) - images(theirs, **wide)).max() < 1e-4
