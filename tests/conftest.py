"""Shared fixtures: small real data (OpenMoji rendered from the font), tiny configs, bad data."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
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
TINY_LDM_CONFIG = ROOT / "configs" / "ldm" / "tiny.yaml"
# stage-2 runs that checkpoint every 2 steps, draw no sample grid and skip the autoencoder check
FAST_STEPS = ["train.checkpoint_every=2", "train.sample_every=100", "model.check_images=0"]


# ---- tiny configs and what tests read of a run ----------------------------------------------------


def autoencoder_cfg(data, out, *overrides):
    """The tiny stage-1 config on ``data``, writing to ``out``."""
    from training.autoencoder_config import AutoencoderJobConfig
    from training.config import load_config

    return load_config(AutoencoderJobConfig, TINY_AE_CONFIG, [f"data.path={data}", f"output_dir={out}", *overrides])


def ldm_cfg(data, vae, out, *overrides):
    """The tiny stage-2 config on ``data`` and the autoencoder folder ``vae``, writing to ``out``."""
    from training.config import load_config
    from training.ldm_config import LdmJobConfig

    return load_config(LdmJobConfig, TINY_LDM_CONFIG, [f"data.path={data}", f"model.vae={vae}", f"output_dir={out}", *overrides])


def data_cfg(path, **kw):
    """A DataConfig on ``path``."""
    from training.data.records import DataConfig

    return DataConfig(path=str(path), **kw)


def unet_weights(run: Path) -> dict:
    """The exported U-Net of a stage-2 run, tensor by tensor."""
    from safetensors.torch import load_file

    return load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    """Bit-identical state dicts."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rgb(color=(255, 0, 0), size=(32, 32)):
    """A plain RGB image (width, height = size)."""
    from PIL import Image

    return Image.new("RGB", size, color)


def png_bytes() -> bytes:
    """A red 32x32 PNG file's bytes."""
    import io

    buf = io.BytesIO()
    rgb().save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def openmoji_small(tmp_path_factory) -> Path:
    """The first 160 OpenMoji emoji at 32x32 with train/test split folders."""
    from training.data.builtin import prepare_openmoji

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


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory):
    """48 captioned images in three shapes (tall, square, wide), with a held-out split; two captions an image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mixed") / "data"
    shapes = [(24, 72), (40, 40), (80, 28)]  # (width, height): tall, square, wide
    for split, n in (("train", 48), ("test", 6)):
        images = {
            f"{i:03d}.png": Image.fromarray(rng.integers(0, 255, (shapes[i % 3][1], shapes[i % 3][0], 3), dtype=np.uint8))
            for i in range(n)
        }
        kinds = ["tall", "square", "wide"]  # several captions each, of comma-separated tags (tests/test_captions.py's kinds)
        captions = {name: [f"a pattern, {kinds[i % 3]}, noise, colour {i}", f"{kinds[i % 3]} noise"] for i, name in enumerate(images)}
        write_imagefolder(root / split, images, captions)
    return root


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory):
    """16 images of uniform noise (32x32, a fixed seed) captioned "a red pattern" / "a blue pattern": data that
    depends on no font or renderer, for the frozen numbers."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {f"{i:02d}.png": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(16)}
    captions = {name: "a red pattern" if i % 2 else "a blue pattern" for i, name in enumerate(images)}
    return write_imagefolder(tmp_path_factory.mktemp("noise") / "data", images, captions)


# fp32, 4 steps, logged every 2: the frozen losses of the tiny configs (tests/test_train_*.py)
FROZEN_STEPS = ["train.max_steps=4", "train.log_every=2", "train.mixed_precision=fp32", "train.sample_every=100",
                "train.checkpoint_every=100"]  # fmt: skip


def logged(run: Path, *keys: str) -> list[dict]:
    """The log.jsonl records of ``run`` that hold ``keys[0]``, with ``step`` and ``keys`` only."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", *keys)} for r in records if keys[0] in r]


def fresh_state(job):
    """``job`` (a training job's ``train``) run in a fresh accelerate state, and leaving one behind:
    accelerate keeps one state per process, and each job must start as a new process would. accelerate has no
    public call for this: ``AcceleratorState._reset_state(True)`` is what its own ``AccelerateTestCase`` does."""
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


# ---- what TensorBoard holds of a run ---------------------------------------------------------------


def event_scalars(run: Path, job: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run``'s TensorBoard events as TensorBoard shows it (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / job), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_images(run: Path, job: str) -> dict[str, list[tuple[int, int, int]]]:
    """{tag: [(step, height, width), ...]} of the images in ``run``'s TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / job), size_guidance={"images": 0}).Reload()
    return {tag: [(e.step, e.height, e.width) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def jsonl_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of a run's log.jsonl, as the trackers are sent it: {tag: [(step, value), ...]}."""
    from training.run.tracking import tracked_values

    scalars: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in tracked_values(record).items():
            scalars.setdefault(tag, []).append((record["step"], value))
    return scalars


def assert_same_scalars(run: Path, job: str) -> dict:
    """TensorBoard shows what log.jsonl holds, each step once; returns the log's scalars."""
    logged, shown = jsonl_scalars(run), event_scalars(run, job)
    assert logged and shown.keys() == logged.keys(), (sorted(shown), sorted(logged))
    for tag, points in logged.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in points], tag  # the same steps, each once
        assert [v for _, v in shown[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in the event file
    return logged


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_to_the_end(cmd: list, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a training command to its end; it must succeed, and exit within seconds of writing its export's
    ``metrics.json`` (a multi-process run once hung there: tests/test_run_guard.py)."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - (Path(out) / "metrics.json").stat().st_mtime < 30
    return done


def no_traceback_of_ours(err: str) -> bool:
    """No frame of this project's code in a traceback on stderr (accelerate's and torchrun's launchers print
    their own on a signal or a failed rank: those are not ours to change)."""
    return not re.search(r'File "[^"]*/(autoencoder|ldm|runtime|training)/', err)


def error_line(err: str) -> str:
    """The one line a command says a user error in: its last line on stderr, starting with ``error: ``,
    with no traceback and no other error before it (progress bars of loading may come first)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err[-3000:]
    assert [line for line in lines if "error:" in line] == lines[-1:], err[-3000:]
    return lines[-1]


def tiny_sdxl_folder(out: Path, seed: int = 0, resolution: int = 32) -> Path:
    """A Stable Diffusion XL folder of tiny random components, written by diffusers' own ``StableDiffusionXLPipeline``
    (as diffusers' SDXL tests build theirs): two CLIP text encoders (the second with a projection, its tokenizer padding
    with "!" as SDXL's does), a U-Net with SDXL's ``text_time`` added embedding, a tiny autoencoder, SDXL's Euler
    scheduler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from autoencoder import build_autoencoder, fit_latent_normalization, set_latent_normalization
    from ldm.text import CLIP_VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    vae = build_autoencoder("tiny", resolution)  # f = 4
    set_latent_normalization(vae, *fit_latent_normalization(vae, [torch.rand(8, 3, resolution, resolution) * 2 - 1]))
    text = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1,
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=16)  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=CLIP_VOCAB_SIZE - 1, **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=0, **text))
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=8,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")  # fmt: skip
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(out / "_tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "_tokenizer", pad_token="!")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)  # fmt: skip
    pipe.save_pretrained(out / "sdxl", safe_serialization=True)
    return out / "sdxl"
