"""Aspect-ratio buckets: images of any shape trained at about the same
pixel count as ``data.resolution``², each at the bucket of the nearest aspect ratio, instead of
a square centre crop.

    sizes = make_buckets(32, divisor=8, min_side=16, max_side=64, step=8)   # [(16, 64), (24, 40), (32, 32), (40, 24), (64, 16)]
    b = nearest_bucket(width=640, height=427, buckets=sizes)                 # a landscape photo -> (24, 40)
    image, crop = cover_and_crop(img, sizes[b])                              # resized to cover it, centre-cropped by the rest
    sampler = BucketBatchSampler(bucket_of, len(sizes), batch_size=8, seed=0, start=k, rank=r, world_size=w)  # training/data/sampler.py

Every batch comes from one bucket; the stream is a function of (seed, batch number) alone, so a
run resumes at any step and 2 ranks with batch 4 see what 1 rank with batch 8 sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from runtime import bf16_narrow_refusal
from runtime.images import TURNED, open_image
from training.config import ConfigError

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class BucketConfig:
    """``data.buckets``: off by default (every image resized and centre-cropped to a square)."""

    enabled: bool = False
    min_side: int | None = None  # default: data.resolution / 2 (down to a multiple of step)
    max_side: int | None = None  # default: data.resolution * 2
    step: int | None = None  # default: the model's total downsampling (autoencoder, x U-Net for stage 2)
    sizes: list[list[int]] | None = None  # [[height, width], ...]: these buckets instead of generated ones


def bucket_sizes(cfg: BucketConfig, resolution: int, divisor: int) -> list[Size]:
    """The buckets ``cfg`` asks for, at ``resolution``² pixels, for a model that downsamples by ``divisor``."""
    if cfg.sizes:
        return check_buckets(cfg.sizes, divisor)
    step = cfg.step or divisor
    lo = cfg.min_side or max(step, resolution // 2 // step * step)
    hi = cfg.max_side or resolution * 2 // step * step
    return make_buckets(resolution, divisor, lo, hi, step)


def image_size(source: Any) -> tuple[int, int] | None:
    """(width, height) from an image's header, after its EXIF orientation (a path, bytes or datasets' ``{"bytes", "path"}``);
    None if it cannot be read (the loader then skips or names it, as without buckets)."""
    if isinstance(source, Image.Image):
        return source.size
    try:
        with open_image(source) as img:  # the file is closed at once: a dataset has many
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in TURNED else (w, h)  # turned, as open_rgb turns it
    except Exception:  # noqa: BLE001  (any undecodable file)
        return None


def assign_buckets(sources: Sequence[Any], buckets: Sequence[Size]) -> list[int]:
    """Each image's bucket (an unreadable one gets the squarest: it is skipped when loaded)."""
    square = nearest_bucket(1, 1, buckets)
    return [square if (wh := image_size(src)) is None else nearest_bucket(wh[0], wh[1], buckets) for src in sources]


def report_buckets(log, step: int, sizes: Sequence[Size], counts: Sequence[int], global_batch: int) -> None:
    """The histogram as a ``buckets`` event of the run's log, and a word about each bucket too small
    for one global batch (its batches repeat its images)."""
    log.write(step=step, event="buckets", sizes=[f"{h}x{w}" for h, w in sizes], images=list(counts))
    for (h, w), n in zip(sizes, counts):
        if 0 < n < global_batch:
            print(f"bucket {h}x{w} holds {n} images, fewer than a global batch of {global_batch}: its batches repeat them")


def refuse_narrow_buckets(sizes: Sequence[Size], downsampling: int, model: str, resolution: int, accelerator) -> None:
    """For a bf16 run on a CPU: an error naming the buckets that bf16 would compute wrongly here
    (:func:`runtime.bf16_narrow_refusal`), and what to change. Nothing in fp32, on a GPU, or where the
    CPU computes them right."""
    if accelerator.mixed_precision != "bf16" or accelerator.device.type != "cpu":
        return
    a, b = 2 * downsampling, 3 * downsampling
    fix = f"data.buckets.min_side={a}, or " if a < resolution else ""  # at resolution <= a only the square would be left
    refusal = bf16_narrow_refusal(
        sizes,
        downsampling,
        model,
        f": {fix}a list such as data.buckets.sizes=[[{b},{a}],[{a},{a}],[{a},{b}]], "
        "or train in fp32 (train.mixed_precision=fp32)",
    )
    if refusal:
        raise ConfigError(f"data.buckets: {refusal}")


def make_buckets(resolution: int, divisor: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """(height, width) buckets of at most ``resolution``² pixels, every side a multiple of ``step``
    (itself a multiple of ``divisor``, the autoencoder x U-Net downsampling) between ``min_side`` and
    ``max_side``: for each side the longest other side that fits the area, keeping only buckets no
    other one contains. Sorted from the tallest to the widest; the square is one when ``resolution``
    is a multiple of ``step``."""
    if step % divisor:
        raise ConfigError(f"data.buckets.step={step} must be a multiple of the total downsampling {divisor}")
    if not 0 < min_side <= resolution <= max_side or min_side % step or max_side % step:
        raise ConfigError(
            f"data.buckets: min_side={min_side} <= data.resolution={resolution} <= max_side={max_side}, "
            f"both multiples of step={step}, is needed"
        )
    area = resolution * resolution
    sides = range(min_side, max_side + 1, step)
    longest = {s: min(max_side, area // s // step * step) for s in sides}
    candidates = {(s, longest[s]) for s in sides if longest[s] >= min_side}
    candidates |= {(w, h) for h, w in candidates}
    kept = [b for b in candidates if not any(o != b and o[0] >= b[0] and o[1] >= b[1] for o in candidates)]
    return sorted(kept, key=lambda b: b[1] / b[0])


def check_buckets(sizes: Sequence[Sequence[int]], divisor: int) -> list[Size]:
    """Listed ``data.buckets.sizes``: (height, width) pairs, each side a multiple of ``divisor``."""
    out = []
    for size in sizes:
        if len(size) != 2 or any(int(s) != s or s <= 0 or s % divisor for s in size):
            raise ConfigError(
                f"data.buckets.sizes: {list(size)} is not a [height, width] pair of multiples of the total downsampling {divisor}"
            )
        out.append((int(size[0]), int(size[1])))
    if len(set(out)) != len(out):
        raise ConfigError(f"data.buckets.sizes lists a size twice: {out}")
    return sorted(out, key=lambda b: b[1] / b[0])


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio: a 2:1 and
    a 1:2 image are as far from square)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


def cover_scale(width: int, height: int, bucket: Size) -> float:
    """The factor that scales an image, aspect kept, to the smallest size that covers ``bucket``."""
    return max(bucket[0] / height, bucket[1] / width)


def cover_size(width: int, height: int, bucket: Size) -> tuple[int, int]:
    """(width, height) of an image scaled by :func:`cover_scale`."""
    scale = cover_scale(width, height, bucket)
    return max(bucket[1], round(width * scale)), max(bucket[0], round(height * scale))


def cover_and_crop(img: Image.Image, bucket: Size) -> tuple[Image.Image, tuple[int, int]]:
    """``img`` resized (Lanczos down, bicubic up, as the square crop) to the smallest size that covers ``bucket`` and centre-cropped to
    it; returns the image and the crop's (top, left) in the resized image (Stable Diffusion XL's
    crop coordinates)."""
    h, w = bucket
    rw, rh = cover_size(img.width, img.height, bucket)
    top, left = (rh - h) // 2, (rw - w) // 2
    resized = img.resize(
        (rw, rh), Image.Resampling.LANCZOS if cover_scale(img.width, img.height, bucket) < 1 else Image.Resampling.BICUBIC
    )
    return resized.crop((left, top, left + w, top + h)), (top, left)


def kept_area(width: int, height: int, bucket: Size) -> float:
    """The fraction of an image's area that :func:`cover_and_crop` keeps."""
    image, kept = width / height, bucket[1] / bucket[0]
    return min(image, kept) / max(image, kept)


def size_name(size: Size) -> str:
    """A bucket's name: ``"24x40"`` for (height 24, width 40), as cache tensors and logs name it."""
    return f"{size[0]}x{size[1]}"


def parse_size(name: str) -> Size:
    """(height, width) of a :func:`size_name`."""
    height, width = name.split("x")
    return int(height), int(width)
