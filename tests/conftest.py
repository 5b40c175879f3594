"""Shared fixtures: small real data (OpenMoji rendered from the font), tiny configs, bad data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="ldm-tests-hf-datasets-"))  # parquet / WebDataset tables

import runtime  # noqa: E402

runtime.configure()  # before any kernel is built: some VMs advertise AMX that traps

ROOT = Path(__file__).resolve().parents[1]
TINY_AE_CONFIG = ROOT / "configs" / "autoencoder" / "tiny.yaml"


@pytest.fixture(scope="session")
def openmoji_small(tmp_path_factory) -> Path:
    """The first 160 OpenMoji emoji at 32x32 with train/test split folders."""
    from training.prepare_data import prepare_openmoji

    out = tmp_path_factory.mktemp("data") / "openmoji-32"
    prepare_openmoji(out, 32, limit=160)
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A tiny random autoencoder folder (stage-2 tests train on its latents)."""
    import torch

    from autoencoder.model import build_autoencoder, save_autoencoder

    torch.manual_seed(0)
    return save_autoencoder(build_autoencoder("tiny", 32), tmp_path_factory.mktemp("vae") / "vae")


def fresh_state(job):
    """``job`` (a training job's ``train``) run in a fresh accelerate state, and leaving one behind:
    accelerate keeps one state per process, and each job must start as a new process would."""
    import functools

    from accelerate.state import AcceleratorState

    @functools.wraps(job)
    def run(*args, **kwargs):
        AcceleratorState._reset_state(True)
        try:
            return job(*args, **kwargs)
        finally:
            AcceleratorState._reset_state(True)

    return run


def write_imagefolder(root: Path, images: dict, captions: dict | None = None) -> Path:
    """images: {file_name: PIL image or raw bytes}; captions: {file_name: text} -> metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            img.save(path)
    if captions is not None:
        with open(root / "metadata.jsonl", "w") as f:
            for name, text in captions.items():
                f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return root


def tiny_pipeline(text: str = "clip", seed: int = 0, resolution: int = 32):
    """A LatentDiffusionPipeline of tiny random components (CLIP from scratch, or the real MiniLM),
    with Stable Diffusion's noise schedule."""
    import torch
    from diffusers import DDPMScheduler

    from autoencoder import build_autoencoder, fit_latent_normalization, set_latent_normalization
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.text import build_clip_text_encoder, clip_tokenizer, load_minilm
    from ldm.unet import build_unet

    torch.manual_seed(seed)
    if text == "clip":
        tokenizer, text_encoder = clip_tokenizer(), build_clip_text_encoder("tiny")
    else:
        tokenizer, text_encoder = load_minilm()
    vae = build_autoencoder("tiny", resolution)  # f = 4
    # unit-variance latents, as a trained autoencoder's export has them
    set_latent_normalization(vae, *fit_latent_normalization(vae, [torch.rand(8, 3, resolution, resolution) * 2 - 1]))
    unet = build_unet("tiny", resolution // 4, text_encoder.config.hidden_size)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    return LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
