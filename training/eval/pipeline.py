"""FD-VGG (with real-data floors) and prompt adherence of a pipeline folder on a captioned dataset:
``python -m training.evaluate pipeline``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from autoencoder.perceptual import LPIPS
from training.data.captions import first_caption
from training.data.loader import eval_loader, spread_indices
from training.data.records import DataConfig, load_records
from training.eval.frechet import frechet_distance, vgg_features

# Captions in a style no training caption has (OpenMoji's are bare names: "red apple"): the same images,
# each caption put in one of these sentences by its position, so a model is also measured on wording it never saw.
UNSEEN_STYLES = ("a drawing of {}", "{}, as a flat icon", "an emoji that shows {}", "a small picture of {} on white")
CAPTION_STYLES = ("train", "unseen")


def restyled(captions: list[str], style: str) -> list[str]:
    """``captions`` as they are (``train``) or each in an unseen sentence (``unseen``, :data:`UNSEEN_STYLES`)."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style '{style}' is unknown; valid: {', '.join(CAPTION_STYLES)}")
    if style == "train":
        return list(captions)
    return [UNSEEN_STYLES[k % len(UNSEEN_STYLES)].format(c) for k, c in enumerate(captions)]


@torch.no_grad()
def reconstructions(vae, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """``images`` (B, 3, R, R) in [-1, 1] encoded (posterior mean) and decoded by ``vae``, clamped to [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    parts = [vae.decode(vae.encode(x.to(dtype)).latent_dist.mode(), return_dict=False)[0] for x in images.split(batch_size)]
    return torch.cat(parts).float().clamp(-1, 1)


def evaluate_pipeline(
    model_dir: str | Path,
    data_dir: str | Path,
    num_prompts: int = 100,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    data_cfg: DataConfig | None = None,
    candidates: int = 20,
    batch_size: int = 50,
    max_real: int = 5000,
    captions_style: str = "train",
    sampler: str = "dpm++",
) -> dict:
    """FD-VGG (with real-data floors) and top-1 prompt adherence of a pipeline on a captioned dataset; with
    ``captions_style="unseen"`` the prompts are the captions reworded (:data:`UNSEEN_STYLES`); ``sampler`` is a
    name of :meth:`LatentDiffusionPipeline.set_scheduler` (the model's own schedule)."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_scheduler(sampler)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.default_resolution
    cfg = replace(data_cfg or DataConfig(), path=str(data_dir), resolution=resolution, random_flip=False)
    records = load_records(data_dir, cfg)
    if len(records) > max_real:
        records = records.select(spread_indices(len(records), max_real))
    real, captions = [], []
    for batch in eval_loader(records, cfg, 256):
        if batch["index"]:
            real.append(batch["pixel_values"])
            captions += [first_caption(text) for text in batch["text"]]  # an image's first caption, where it has several
    real = torch.cat(real)  # (N, 3, R, R) in [-1, 1]
    n = min(num_prompts, len(real) // 2)
    if n < 2 or len(real) < candidates:
        raise ValueError(f"{data_dir}: {len(real)} readable images; the evaluation needs at least {max(candidates, 4)}")
    chosen = spread_indices(len(real), n)
    prompts = restyled([captions[i] for i in chosen], captions_style)

    generated = []
    for start in range(0, n, batch_size):
        part = chosen[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(part))]
        images = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pt",
        ).images  # (b, 3, R, R) in [0, 1]
        generated.append(images.float().cpu() * 2 - 1)
    generated = torch.cat(generated)

    lpips = LPIPS.pretrained()
    real_f, gen_f = vgg_features(lpips, real), vgg_features(lpips, generated)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(real), generator=g)
    rest = torch.ones(len(real), dtype=torch.bool)
    rest[perm[:n]] = False
    recon_f = vgg_features(lpips, reconstructions(pipe.vae, real[perm[:n]], batch_size))
    halves = perm[: len(real) // 2], perm[len(real) // 2 :]

    hits = 0
    with torch.inference_mode():
        for k, i in enumerate(chosen):
            others = torch.tensor([j for j in torch.randperm(len(real), generator=g).tolist() if j != i][: candidates - 1])
            pool = torch.cat([torch.tensor([i]), others])  # the true image first
            image = [f.expand(len(pool), -1, -1, -1) for f in lpips.features(generated[k : k + 1])]  # once, not per candidate
            d = lpips.distance(image, lpips.features(real[pool]))
            hits += int(d.argmin().item() == 0)
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "resolution": resolution,
        "prompts": n,
        "steps": steps,
        "guidance": guidance,
        "sampler": sampler,
        "captions": captions_style,
        "fd_vgg": frechet_distance(gen_f, real_f),
        "fd_vgg_floor_real_sample": frechet_distance(real_f[perm[:n]], real_f[rest]),
        # the same n real images through the pipeline's autoencoder (encode, decode): the best FD its decoder allows
        "fd_vgg_floor_autoencoder": frechet_distance(recon_f, real_f[rest]),
        "fd_vgg_real_halves": frechet_distance(real_f[halves[0]], real_f[halves[1]]),
        "prompt_top1": hits / n,
        "prompt_top1_chance": 1 / candidates,
        "candidates": candidates,
    }
