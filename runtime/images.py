"""Turning whatever image a user has into the RGB the autoencoder expects."""

from __future__ import annotations

from PIL import Image, ImageOps


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
