"""Turning whatever image a user has into the RGB the autoencoder expects, and tensors back into
image grids."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# EXIF orientations that turn the stored image by 90 or 270 degrees (width and height swap)
TURNED = (5, 6, 7, 8)


def open_image(source: Any) -> Image.Image:
    """Open (lazily: only the header is read) a path, bytes, datasets' ``{"bytes", "path"}`` or a
    PIL image."""
    if isinstance(source, dict):
        source = BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    elif isinstance(source, (bytes, bytearray)):
        source = BytesIO(source)
    return source if isinstance(source, Image.Image) else Image.open(source)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with the stored EXIF orientation applied; transparency goes onto white (as the
    training data is prepared, so an emoji with alpha looks the same to every stage)."""
    img = ImageOps.exif_transpose(img)  # camera photos: apply the stored orientation
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, img).convert("RGB")
    return img.convert("RGB")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Each row is a (B, 3, H, W) batch in [-1, 1]; rows are stacked top to bottom."""
    imgs = [to_uint8(r) for r in rows]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in imgs], axis=0)  # (rows*H, B*W, 3)
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
