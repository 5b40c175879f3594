"""How much of each photo a model trains on: aspect-ratio buckets vs the square centre crop.

    .venv/bin/python benchmarks/bucket_area.py [--resolution 64] [--step 8] [--json benchmarks/BUCKET_AREA.json]

The photos are every image scikit-image and scikit-learn ship (real photographs and scans of many
shapes: 1:1, 3:2, 4:3, 2:3, 16:9 and wider). For each, the fraction of its area kept by
``cover_and_crop`` at its nearest bucket, and by a centre crop to ``resolution`` x ``resolution``
(what the jobs do without ``data.buckets``). Training throughput with and without buckets comes
with stage 2's buckets (issue 17).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.buckets import BucketConfig, bucket_sizes, kept_area, nearest_bucket  # noqa: E402
from training.data.builtin import package_file  # noqa: E402


def photos() -> dict[str, tuple[int, int]]:
    """name -> (width, height) of every image file the two packages ship."""
    folders = {"skimage": package_file("skimage", "data", "astronaut.png").parent,
               "sklearn": package_file("sklearn", "datasets", "images", "china.jpg").parent}  # fmt: skip
    sizes = {}
    for package, folder in folders.items():
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".tif"):
                try:
                    with Image.open(path) as img:
                        sizes[f"{package}/{path.name}"] = img.size
                except OSError:  # a TIFF variant Pillow cannot read
                    continue
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--step", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    r, step = args.resolution, args.step
    buckets = bucket_sizes(BucketConfig(step=step), r, step)  # the defaults data.buckets has
    rows = []
    for name, (w, h) in photos().items():
        b = buckets[nearest_bucket(w, h, buckets)]
        rows.append({"photo": name, "width": w, "height": h, "bucket": f"{b[0]}x{b[1]}",
                     "kept_bucket": round(kept_area(w, h, b), 4), "kept_square": round(kept_area(w, h, (r, r)), 4)})  # fmt: skip
    non_square = [x for x in rows if x["width"] != x["height"]]
    summary = {"photos": len(rows), "non_square": len(non_square), "buckets": [f"{h}x{w}" for h, w in buckets],
               "mean_kept_bucket": round(mean(x["kept_bucket"] for x in rows), 4),
               "mean_kept_square": round(mean(x["kept_square"] for x in rows), 4),
               "mean_kept_bucket_non_square": round(mean(x["kept_bucket"] for x in non_square), 4),
               "mean_kept_square_non_square": round(mean(x["kept_square"] for x in non_square), 4),
               "min_kept_bucket": min(x["kept_bucket"] for x in rows), "min_kept_square": min(x["kept_square"] for x in rows)}  # fmt: skip
    print(f"{'photo':<34}{'size':>11}{'bucket':>8}{'kept, bucket':>14}{'kept, square':>14}")
    for x in rows:
        print(f"{x['photo']:<34}{x['width']:>5}x{x['height']:<5}{x['bucket']:>8}{x['kept_bucket']:>14.1%}{x['kept_square']:>14.1%}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"resolution": r, "step": step, "summary": summary, "photos": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
