"""Masked loss (``data.mask``): each image's mask weights the latent model's per-element loss, so the parts of an image
it marks are learned and the rest is not (a subject, not its background).

A mask is the image's alpha channel (``data.mask: alpha``; an image without one counts everywhere) or a mask image of
the same stem in a folder (``data.mask: path/to/masks``; any image format, read as grey: white counts, black does not).
It is resized and cropped with its image (and mirrored with it), then reduced to the latent grid by the mean over each
latent pixel's area, and cached as uint8 beside the moments (``mask@HxW``): the weight of a latent element is
``cached / 255``, and an all-white mask weights every element 1 exactly, which is the unmasked loss.

    loss(sample) = mean over C, h, w of  mask[h, w] * (prediction - target)^2
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from training.data.records import IMAGE_EXTENSIONS, DataError

ALPHA = "alpha"


class MaskSource:
    """Where ``data.mask`` reads each image's mask from."""

    def __init__(self, mask: str) -> None:
        self.mask = mask
        if mask != ALPHA:
            folder = Path(mask)
            if not folder.is_dir():
                raise DataError(f"data.mask='{mask}' is neither 'alpha' nor a folder of mask images")
            self.files = _mask_files(str(folder.resolve()), folder.stat().st_mtime_ns)

    def file_of(self, image: Any) -> Path:
        """The mask image of ``image`` (a path), by its stem; missing is an error naming both."""
        path = image.get("path") if isinstance(image, dict) else image
        if not isinstance(path, (str, Path)) or not path:
            raise DataError(f"data.mask='{self.mask}' finds masks by image file name; these images are bytes without one")
        stem = Path(path).stem
        if stem not in self.files:
            raise DataError(f"no mask for '{path}' in data.mask='{self.mask}' (expected {stem}.png or another image format)")
        return self.files[stem]

    def open(self, image: Any, raw: Image.Image) -> Image.Image:
        """The mask (mode L, the size of ``raw``, the image as decoded, EXIF orientation not yet applied)."""
        if self.mask == ALPHA:
            if raw.mode == "P" and "transparency" in raw.info:
                raw = raw.convert("RGBA")
            has_alpha = raw.mode in ("RGBA", "LA", "PA")
            return ImageOps.exif_transpose(raw.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", raw.size, 255))
        path = self.file_of(image)
        try:
            with Image.open(path) as opened:
                mask = ImageOps.exif_transpose(opened.convert("L"))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read mask '{path}' of image '{image}': {err}") from None
        size = ImageOps.exif_transpose(raw).size
        return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=8)
def _mask_files(folder: str, mtime_ns: int) -> dict[str, Path]:
    """{stem: mask file} of a mask folder, subfolders too, listed once per process (the cache encodes each shard and
    bucket through a loader of its own, and each would list a folder of 100,000 masks again); ``mtime_ns`` keys it
    to the folder's state."""
    files: dict[str, Path] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if path.stem in files:  # by stem, so two masks of one name would be a guess
            raise DataError(f"data.mask='{folder}' holds two masks named {path.stem} ({files[path.stem]}, {path})")
        files[path.stem] = path
    return files


def check_masks(records: datasets.Dataset, mask: str | None) -> None:
    """Before any work: a mask folder holds a mask for every image (the first missing one is named), and no two images
    share a name (masks are found by it)."""
    if mask is None or mask == ALPHA:
        return
    source, seen = MaskSource(mask), {}
    for row in records.select_columns(["image"]):
        path = source.file_of(row["image"])
        image = row["image"].get("path") if isinstance(row["image"], dict) else row["image"]
        if path in seen:
            raise DataError(
                f"images '{seen[path]}' and '{image}' share the name {path.stem}: data.mask finds masks by name; rename one"
            )
        seen[path] = image


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """PIL L -> (1, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 1, h, w) uint8: the mean over each latent pixel's area, in 255ths."""
    return (F.interpolate(mask.float(), size=size, mode="area") * 255).round().to(torch.uint8)


def loss_weights(cached: torch.Tensor) -> torch.Tensor:
    """The cached uint8 mask as the loss's weights in [0, 1] (255 -> exactly 1)."""
    return cached.float() / 255.0


def mask_digest(records: datasets.Dataset, mask: str | None) -> str | None:
    """What the masks add to the cache key: None (no mask), 'alpha' (the images' bytes are in the key already), or each
    mask file's name, size and time."""
    if mask is None or mask == ALPHA:
        return mask
    source, h = MaskSource(mask), hashlib.sha256()
    for row in records.select_columns(["image"]):
        path = source.file_of(row["image"])
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
