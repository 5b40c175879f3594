"""From records to tensors: decode, resize and centre-crop (or cover an aspect-ratio bucket), and
batch, as the training and evaluation loaders do."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from runtime.images import open_image, to_rgb
from training.data.masks import MaskSource, mask_tensor
from training.data.buckets import Size, cover_and_crop, cover_size
from training.data.records import DataConfig, DataError, OnBadImage, describe
from training.data.sampler import BatchStream


def open_rgb(source: Any) -> Image.Image:
    """Decode a path / bytes / ``{"bytes", "path"}`` into RGB; transparency goes onto white."""
    img = open_image(source)
    img.load()  # truncated files fail here, not later
    return to_rgb(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes and transforms one record; the key may be ``index`` or ``(index, flip)``. Each image is resized to cover
    its bucket and centre-cropped to it (:func:`cover_and_crop`); without buckets the bucket is the square
    ``data.resolution``², which is the shorter side resized to it and the centre crop."""

    def __init__(
        self, records: datasets.Dataset, cfg: DataConfig, buckets: list[Size] | None = None, bucket_of: list[int] | None = None
    ) -> None:
        self.records = records
        self.on_bad_image = OnBadImage(cfg.on_bad_image)
        self.buckets = buckets or [(cfg.resolution, cfg.resolution)]
        self.bucket_of = bucket_of if buckets else None  # None: every image's bucket is the square
        self.masks = MaskSource(cfg.mask) if cfg.mask else None  # data.mask: each image's loss mask too

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict:
        index, flip = key if isinstance(key, tuple) else (key, False)
        row = self.records[int(index)]
        try:
            raw = open_image(row["image"])
            raw.load()  # truncated files fail here, not later
            img = to_rgb(raw)
        except Exception as err:  # noqa: BLE001 - any undecodable file is "bad data", never a crash
            if self.on_bad_image == OnBadImage.error:
                raise DataError(
                    f"cannot read image '{describe(row['image'])}': {err} (set data.on_bad_image=skip to skip such files)"
                ) from None
            return {"bad": describe(row["image"])}
        h, w = self.buckets[0 if self.bucket_of is None else self.bucket_of[int(index)]]
        upscaled = img.height < h or img.width < w  # smaller than its bucket (or the square)
        cropped, (top, left) = cover_and_crop(img, (h, w))
        x = to_tensor(cropped)  # (3, h, w)
        item = {"pixel_values": x.flip(-1) if flip else x, "text": row["text"], "index": int(index), "upscaled": upscaled}
        # Stable Diffusion XL's size and crop conditioning of this image and of its mirror (whose crop starts where this
        # one's right edge is, counted from the resized image's right): original (h, w), crop (top, left), target (h, w)
        mirrored_left = cover_size(img.width, img.height, (h, w))[0] - left - w
        time_ids = [torch.tensor([img.height, img.width, top, at, h, w], dtype=torch.int32) for at in (left, mirrored_left)]
        item["time_ids"], item["time_ids_flipped"] = time_ids[::-1] if flip else time_ids
        if self.masks is not None:  # cropped and mirrored with its image: (1, h, w) in [0, 1]
            mask = mask_tensor(cover_and_crop(self.masks.open(row["image"], raw), (h, w))[0])
            item["mask"] = mask.flip(-1) if flip else mask
        return item


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "bad" not in it]
    bad = [it["bad"] for it in items if "bad" in it]
    if good:
        pixels = torch.stack([it["pixel_values"] for it in good])
    else:
        pixels = torch.empty(0)
    batch = {
        "pixel_values": pixels,  # (B', 3, R, R), B' <= B after skipping bad files
        "text": [it["text"] for it in good],
        "index": [it["index"] for it in good],
        "bad_files": bad,
        "upscaled": sum(it["upscaled"] for it in good),  # images smaller than the resolution
    }
    if good:  # (B', 6) Stable Diffusion XL's time ids of each image and of its mirror
        batch["time_ids"], batch["time_ids_flipped"] = (
            torch.stack([it[k] for it in good]) for k in ("time_ids", "time_ids_flipped")
        )
    if good and "mask" in good[0]:
        batch["mask"] = torch.stack([it["mask"] for it in good])  # (B', 1, R, R) data.mask's weights
    return batch


def train_loader(records: datasets.Dataset, cfg: DataConfig, stream: BatchStream, start: int = 0) -> torch.utils.data.DataLoader:
    """Endless shuffled batches of ``stream`` from batch ``start`` on; with buckets every batch holds
    images of one bucket, each covering it and centre-cropped."""
    return torch.utils.data.DataLoader(
        ImageCaptionDataset(records, cfg, stream.sizes, stream.bucket_of),
        batch_sampler=stream.sampler(start),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=_own_generator(stream.seed),
    )


class ReadableBatches:
    """A training loader's micro-batches, each with at least one readable image on every process: a batch whose
    images are all unreadable on some process is skipped by all of them, so they stay at one position in the data.
    Counts the micro-batches drawn (the position a checkpoint records) and this process's unreadable images."""

    def __init__(self, loader: torch.utils.data.DataLoader, accelerator, micro_batches: int, bad_images: int) -> None:
        self.batches, self.accelerator = iter(loader), accelerator
        self.micro_batches = micro_batches
        self.bad_images = bad_images if accelerator.is_main_process else 0  # the total so far counts once, on rank 0

    def __iter__(self) -> ReadableBatches:
        return self

    def __next__(self) -> dict:
        while True:
            batch = next(self.batches)
            self.micro_batches += 1
            self.bad_images += len(batch["bad_files"])
            empty = torch.tensor(float(batch["pixel_values"].numel() == 0), device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                empty = self.accelerator.reduce(empty, "sum")
            if empty.item() == 0:
                return batch

    def total_bad(self) -> int:
        """The unreadable images of every process so far (a collective: every process calls it)."""
        return int(self.accelerator.reduce(torch.tensor(self.bad_images, device=self.accelerator.device), "sum").item())


def spread_indices(num_items: int, n: int) -> list[int]:
    """``min(n, num_items)`` indices spread evenly over ``range(num_items)``."""
    n = min(n, num_items)
    return [i * num_items // n for i in range(n)]


def eval_loader(
    records: datasets.Dataset, cfg: DataConfig, batch_size: int, size: Size | None = None
) -> torch.utils.data.DataLoader:
    """Every image in order, resized and centre-cropped to the square ``data.resolution``, or to
    cover ``size`` (height, width), aspect kept, and centre-cropped to it."""
    dataset = ImageCaptionDataset(records, cfg, [size] if size else None)  # one bucket: every image's
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=_own_generator(0)
    )


def _own_generator(seed: int) -> torch.Generator:
    """DataLoader iterators draw a seed at creation; from the global RNG that would shift every
    later random draw and break exact resume, so each loader gets its own generator."""
    return torch.Generator().manual_seed(seed)
