"""Sample grids during stage 2: a row per validation prompt, the same seeds every time, with the EMA
weights swapped in; at each bucket shape when the run trains on buckets."""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from ldm.pipeline import LatentDiffusionPipeline
from ldm.sdxl import LatentDiffusionXLPipeline
from ldm.text import XLTextEncoders
from ldm.schedulers import make_scheduler
from runtime.images import save_grid
from training.ldm_config import SampleConfig


class ema_weights:
    """Temporarily swap the EMA weights into the U-Net (for samples). A post-hoc EMA has no one length yet: its samples
    are of the trained weights, as its export is."""

    def __init__(self, ema, params: list) -> None:
        self.ema, self.params = ema if isinstance(ema, EMAModel) else None, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def pipeline_of(vae, text_encoder, tokenizer, unet, scheduler) -> LatentDiffusionPipeline:
    """The pipeline of a run's parts; Stable Diffusion XL's two encoders and tokenizers (trained as one) as its sibling."""
    if isinstance(text_encoder, XLTextEncoders):
        pipe = LatentDiffusionXLPipeline.of(vae, text_encoder, tokenizer, unet, scheduler)
    else:
        pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def save_samples(
    pipe: LatentDiffusionPipeline, cfg: SampleConfig, path: Path, shapes: list | None = None, step_counts: list | None = None
) -> Path:
    """A grid with a row per validation prompt, the same seeds every time; with ``shapes`` ((height,
    width) in pixels), the row holds the prompt's images at each shape, each on a white cell of the
    largest height and width; with ``step_counts`` (a few-step student's 1, 2, 4), at each number of steps."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config)
    n, cells = cfg.images_per_prompt, []
    for (height, width), steps in product(shapes or [(None, None)], step_counts or [cfg.steps]):  # None: the default size
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(cfg.prompts) * n)]
        cells.append(
            pipe(
                list(cfg.prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=cfg.guidance,
                num_images_per_prompt=n,
                generator=generators,
                output_type="pt",
            ).images
            * 2
            - 1
        )  # (P*n, 3, H, W)
    pipe.unet.train(was_training)
    H, W = max(c.shape[2] for c in cells), max(c.shape[3] for c in cells)
    cells = [
        F.pad(c, ((W - c.shape[3]) // 2, (W - c.shape[3] + 1) // 2, (H - c.shape[2]) // 2, (H - c.shape[2] + 1) // 2), value=1.0)
        for c in cells
    ]
    rows = [torch.cat([c[i * n : (i + 1) * n] for c in cells]) for i in range(len(cfg.prompts))]
    return save_grid(rows, path, scale=2)


def sample_shapes(sizes: list | None) -> list | None:
    """The shapes of the sample grids with buckets: the tallest, the squarest and the widest bucket."""
    if not sizes:
        return None
    squarest = min(sizes, key=lambda s: abs(math.log(s[1] / s[0])))
    return list(dict.fromkeys([sizes[0], squarest, sizes[-1]]))  # sizes run from the tallest to the widest
