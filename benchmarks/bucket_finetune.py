"""What buckets teach: the demo model fine-tuned on emoji of three shapes, generating wide and tall.

    .venv/bin/python benchmarks/bucket_finetune.py [--steps 400] [--json benchmarks/BUCKET_FINETUNE.json] [--grid docs/buckets.png]

The base is ``make demo``'s model (``runs/ldm-openmoji-32/pipeline``), trained on square 32x32
emoji. Asked for 32x48 or 48x32 it stretches the emoji to fill the frame. The fine-tuning set is
the OpenMoji training split with every third emoji on a wide white canvas (48x32, width x height),
every third on a tall one (32x48) and the rest square, each with its own caption; it trains with
``configs/finetune/full-openmoji.yaml`` and ``data.buckets.sizes=[[48,32],[32,32],[32,48]]`` (height
x width), so each shape trains at its own size, uncropped.

Measured on 8 prompts (7 of them captions in the training split, where they come square, wide
or tall) x 4 seeds at each of 32x48 and 48x32, before and after: the share of "ink" (pixels with
a channel below 200) in the margins (the 8-pixel strips at the two ends of the long side, white
in every training image of that shape) and in the centre square. A grid of
both, base and fine-tuned, goes to ``--grid``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from benchmarks.report import machine  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data.records import DataConfig, load_records  # noqa: E402
from training.data.loader import open_rgb
from training.ldm_config import LdmJobConfig  # noqa: E402
from training.data.builtin import write_metadata  # noqa: E402

BASE = ROOT / "runs" / "ldm-openmoji-32" / "pipeline"
DATA = ROOT / "data" / "openmoji-32"
PROMPTS = ["red apple", "rocket", "sun", "dog face", "pine tree", "red heart", "snowflake", "grinning face"]
SHAPES = {"wide": (32, 48), "tall": (48, 32)}  # (height, width)


def mixed_set(out: Path) -> dict:
    """The training split, every third emoji on a wide canvas and every third on a tall one."""
    records = load_records(DATA, DataConfig(path=str(DATA)), captions=True)
    out.mkdir(parents=True)
    rows, counts = [], {"square": 0, "wide": 0, "tall": 0}
    for i, row in enumerate(records):
        emoji = open_rgb(row["image"])  # 32x32, white background
        kind = ("square", "wide", "tall")[i % 3]
        if kind != "square":
            h, w = SHAPES[kind]
            canvas = Image.new("RGB", (w, h), (255, 255, 255))
            canvas.paste(emoji, ((w - 32) // 2, (h - 32) // 2))
            emoji = canvas
        emoji.save(out / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": row["text"]})
        counts[kind] += 1
    write_metadata(out, rows)
    return counts


def ink(images: list[Image.Image], shape: str) -> dict:
    """Share of non-white pixels in the margins (8 px at each end of the long side) and in the centre square."""
    px = np.stack([np.asarray(im) for im in images]).min(axis=-1) < 200  # (N, H, W)
    if shape == "wide":
        margins, centre = np.concatenate([px[:, :, :8], px[:, :, -8:]], axis=2), px[:, :, 8:-8]
    else:
        margins, centre = np.concatenate([px[:, :8], px[:, -8:]], axis=1), px[:, 8:-8]
    return {"margin_ink": round(float(margins.mean()), 4), "centre_ink": round(float(centre.mean()), 4)}


@torch.no_grad()
def generate(folder: Path) -> dict[str, list[Image.Image]]:
    from ldm import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, (h, w) in SHAPES.items():
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(PROMPTS) * 4)]
        out[name] = pipe(PROMPTS, height=h, width=w, num_images_per_prompt=4, num_inference_steps=25, guidance_scale=3.0,
                         generator=gens).images  # fmt: skip
    return out


def grid(before: dict, after: dict, path: Path, rows: int = 4, scale: int = 3) -> None:
    """A row per prompt: base wide, fine-tuned wide, base tall, fine-tuned tall (first seed), on grey cells."""
    cell, pad = 48 + 4, 2
    img = Image.new("RGB", (4 * cell, rows * cell), (200, 200, 200))
    for r in range(rows):
        for c, im in enumerate([before["wide"][4 * r], after["wide"][4 * r], before["tall"][4 * r], after["tall"][4 * r]]):
            img.paste(im, (c * cell + pad + (48 - im.width) // 2, r * cell + pad + (48 - im.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="keep the fine-tuned run here (default: a temporary folder)")
    args = p.parse_args()
    runtime.configure()
    if not (BASE / "model_index.json").is_file():
        sys.exit(f"{BASE} is missing: run `make demo` first")
    from training.train_ldm import train

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        counts = mixed_set(tmp / "mixed")
        out = args.keep or tmp / "run"
        cfg = load_config(LdmJobConfig, ROOT / "configs" / "finetune" / "full-openmoji.yaml",
                          [f"model.init_from={BASE}", f"data.path={tmp / 'mixed'}", f"output_dir={out}", "data.buckets.enabled=true",
                           "data.buckets.sizes=[[48,32],[32,32],[32,48]]", "train.batch_size=32", f"train.max_steps={args.steps}",
                           "train.log_every=20", f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps}",
                           "model.check_images=0", "sample.prompts=[red apple,rocket,sun]"])  # fmt: skip
        start = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - start
        before, after = generate(BASE), generate(out / "pipeline")
        results = {"machine": machine(), "set": counts, "steps": args.steps, "batch": 32, "train_seconds": round(seconds, 1),
                   "before": {s: ink(before[s], s) for s in SHAPES}, "after": {s: ink(after[s], s) for s in SHAPES}}  # fmt: skip
        print(json.dumps({k: v for k, v in results.items() if k != "machine"}))
        if args.grid:
            grid(before, after, args.grid)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
