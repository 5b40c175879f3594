"""DreamBooth's prior preservation (``prior.*``; Ruiz et al. 2023, as diffusers' DreamBooth script and kohya's
``reg_data_dir`` do it): while the model learns a few instance images, it keeps drawing its class as the base model did.

- **Class images.** ``prior.class_data`` is a folder of images of the class; where it holds fewer than
  ``prior.num_class_images``, the base model (``model.init_from``, before any training) draws the missing ones from
  ``prior.class_prompt`` into it once, ``class-00000.png`` ... each from its own seed (``seed``, index), so a relaunch
  or another machine makes the same images and finds them there. Every class image is captioned ``prior.class_prompt``.
- **Batches.** Every micro-batch is ``train.batch_size`` instance images followed by as many class images, drawn by a
  stream of their own from the run's seed: a resumed run and any number of processes mix the same ones.
- **Loss.** ``mean(instance losses) + prior.loss_weight * mean(class losses)``, each the objective's per-sample loss.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.schedulers import folder_scheduler
from ldm.text import uses_attention_mask
from training.data.records import IMAGE_EXTENSIONS, DataError, load_records
from training.stage2.batches import MicroBatch, NoisyBatches
from training.stage2.cache import open_latent_cache
from training.stage2.conditioning import Conditioning
from training.stage2.samples import pipeline_of

PRIOR_SEED = 104_729  # the class stream's and class draws' offset from the run's seed


def class_image_count(cfg) -> int:
    """The images prior.class_data holds now, counted as its records are read (0: no folder, or no image yet)."""
    folder = Path(cfg.prior.class_data)
    if (folder / "metadata.jsonl").is_file():
        raise DataError(
            f"prior.class_data='{folder}' holds a metadata.jsonl: class images are all captioned prior.class_prompt, "
            "and the drawn ones would not be in it; remove it"
        )
    if not folder.is_dir() or not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
        return 0
    return len(class_records(cfg)[0])


@torch.no_grad()
def make_class_images(cfg, pipe, accelerator) -> None:
    """The missing class images, drawn by the base pipeline, each process its share (every image has its own seed, so
    the images do not depend on how many there are), each written under a temporary name and renamed: an interrupted
    run keeps the finished ones. A name already there (a user's own file) is skipped, never overwritten."""
    prior, folder = cfg.prior, Path(cfg.prior.class_data)
    missing, free, i = prior.num_class_images - class_image_count(cfg), [], 0
    while len(free) < missing:  # the first free names: class-00000.png, ...
        free += [i] if not (folder / f"class-{i:05d}.png").exists() else []
        i += 1
    mine = free[accelerator.process_index :: accelerator.num_processes]
    accelerator.wait_for_everyone()  # every process has counted before any writes
    if missing > 0 and accelerator.is_main_process:
        print(f"prior preservation: drawing {missing} class images of '{prior.class_prompt}' into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    modules = [pipe.unet, *pipe.text_encoders]  # Stable Diffusion XL: both encoders
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # as the base model generates
    for start in range(0, len(mine), 8):
        part = mine[start : start + 8]
        generators = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + PRIOR_SEED + i) for i in part]
        images = pipe(
            [prior.class_prompt] * len(part), num_inference_steps=prior.steps, guidance_scale=prior.guidance,
            height=cfg.data.resolution, width=cfg.data.resolution, generator=generators,
        ).images  # fmt: skip
        for i, image in zip(part, images):
            tmp = folder / f".class-{i:05d}.png.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / f"class-{i:05d}.png")
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    accelerator.wait_for_everyone()


def class_records(cfg):
    """The class images, captioned prior.class_prompt (the first num_class_images of the folder, by name)."""
    data = replace(cfg.data, path=cfg.prior.class_data, caption=cfg.prior.class_prompt, mask=None)
    records = load_records(cfg.prior.class_data, data, captions=True)
    return records.select(range(min(len(records), cfg.prior.num_class_images))), data


def open_prior(cfg, models, accelerator, objective, levels: dict | None) -> PriorPreservation:
    """Before the first step, on the base model: the class images (drawn where missing), their latent cache (in the
    ``class/`` folder of the run's cache folder) and their stream of micro-batches."""
    base = pipeline_of(
        models.vae, models.text_encoder, models.tokenizer, models.unet, folder_scheduler(models.noise_scheduler.config)
    )
    make_class_images(cfg, base, accelerator)
    records, data = class_records(cfg)
    folder = Path(cfg.cache.dir or Path(cfg.output_dir) / "latent-cache") / "class"  # its own: a cache folder keeps one key
    cache = open_latent_cache(
        replace(cfg, data=data, cache=replace(cfg.cache, dir=str(folder))), models, records, None, accelerator
    )
    text = models.text_encoder
    conditioning = Conditioning(cache, models.tokenizer, text, models.text_trains, uses_attention_mask(text))
    seed, rank, world = cfg.seed + PRIOR_SEED, accelerator.process_index, accelerator.num_processes
    stream = cache.batch_stream(cfg.train.batch_size, seed, rank, world, cfg.data.random_flip)
    batches = NoisyBatches(cache, stream, conditioning, objective, models.vae, cfg, levels, accelerator.device, seed)
    return PriorPreservation(batches, cfg.prior.loss_weight)


class PriorPreservation:
    """The class images' micro-batches beside the instance ones, and the loss of both."""

    def __init__(self, batches: NoisyBatches, loss_weight: float) -> None:
        self.batches, self.loss_weight = batches, loss_weight

    def joined(self, instance: MicroBatch, micro: int, rank: int, world: int) -> MicroBatch:
        """The instance micro-batch followed by as many class images (the same latent shape: square crops)."""
        cls = self.batches.next(micro, rank, world)
        self.instances = len(instance.x_t)
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        masks = None if instance.mask is None else cat(instance.mask, torch.ones_like(cls.x_t[:, :1]))
        return MicroBatch(
            cat(instance.x_t, cls.x_t), cat(instance.t, cls.t), joined_conditioning(instance.cond, cls.cond),
            cat(instance.target, cls.target), cat(instance.level, cls.level), masks,
        )  # fmt: skip

    def loss(self, per_sample: torch.Tensor) -> torch.Tensor:
        """mean(instance) + loss_weight * mean(class)."""
        return per_sample[: self.instances].mean() + self.loss_weight * per_sample[self.instances :].mean()


def joined_conditioning(a: dict, b: dict) -> dict:
    """Two micro-batches' text arguments as one: states (or token ids) padded to the longer length, padding masked out
    where the encoder is masked (an unmasked encoder, CLIP, has one length: 77)."""
    key = "states" if "states" in a else "input_ids"
    tokens = lambda x: x.shape[-2] if key == "states" else x.shape[-1]  # noqa: E731  (states (B, L, D); ids (B, [2,] L))
    length = max(tokens(a[key]), tokens(b[key]))

    def padded(x: torch.Tensor) -> torch.Tensor:
        pad = length - x.shape[1]
        return x if pad == 0 else F.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad))

    if a["mask"] is None and tokens(a[key]) != tokens(b[key]):
        raise RuntimeError(f"caption states of two lengths ({tokens(a[key])}, {tokens(b[key])}) for an unmasked text encoder")
    out = {key: torch.cat([padded(a[key]), padded(b[key])])}
    out["mask"] = None if a["mask"] is None else torch.cat([padded(a["mask"]), padded(b["mask"])])
    for extra in ("pooled", "time_ids"):  # Stable Diffusion XL's, one row a sample
        if extra in a:
            out[extra] = torch.cat([a[extra], b[extra]])
    return out
