"""Turning whatever image a user has into the RGB the autoencoder expects."""

from __future__ import annotations

from io import BytesIO
from typing import Any

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
