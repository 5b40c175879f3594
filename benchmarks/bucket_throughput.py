"""Training throughput with and without aspect-ratio buckets, both jobs, on one mixed-shape set.

    .venv/bin/python benchmarks/bucket_throughput.py [--steps 100] [--ae-steps 200] [--json benchmarks/BUCKET_THROUGHPUT.json]

The set: every photo scikit-image and scikit-learn ship (as benchmarks/bucket_area.py), each cut
into 8 crops of random aspect ratio (1:3 to 3:1) and written by ``prepare_data folder
--keep-aspect`` at 64 px: 240 captioned images of many shapes. Each job runs its shipped config
at ``data.resolution=64`` on that folder (stage 2: ``configs/ldm/openmoji-32.yaml``, base U-Net,
MiniLM, batch 64; stage 1: ``configs/autoencoder/openmoji-32-f4.yaml``, batch 8) twice,
``data.buckets.enabled`` false (every image centre-cropped to 64x64) and true (the default
buckets: 32x128 ... 128x32 in steps of the model's downsampling), one after the other in this
process. (At 32 px the base U-Net's buckets would be 16 pixels on a side, too narrow for bf16 on
an AMX CPU: ``training.buckets.refuse_narrow_buckets``.) Reported: the median
images/s over the logged windows after the first, the pixels per image trained, and the
wall-clock of the whole job (stage 2: including the latent cache's encode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from benchmarks.bucket_area import photos  # noqa: E402
from benchmarks.report import machine  # noqa: E402
from training.autoencoder_config import AutoencoderJobConfig  # noqa: E402
from training.config import load_config  # noqa: E402
from training.ldm_config import LdmJobConfig  # noqa: E402
from training.data.builtin import package_file, write_metadata  # noqa: E402
from training.prepare_data import prepare_folder  # noqa: E402

VAE = ROOT / "runs" / "autoencoder-openmoji-32-f4" / "vae"


def mixed_set(tmp: Path, crops: int = 8, size: int = 64) -> tuple[Path, dict]:
    """``crops`` random crops of each shipped photo, aspect ratios 1:3 to 3:1, prepared with --keep-aspect."""
    import random

    rng = random.Random(0)
    src = tmp / "crops"
    src.mkdir()
    rows = []
    for name in photos():
        package, file = name.split("/")
        folder = package_file("skimage", "data", "astronaut.png").parent if package == "skimage" else \
            package_file("sklearn", "datasets", "images", "china.jpg").parent  # fmt: skip
        with Image.open(folder / file) as img:
            img = img.convert("RGB")
        for k in range(crops):
            ratio = 3 ** rng.uniform(-1, 1)  # width / height
            w = min(img.width, round(img.height * ratio))
            h = min(img.height, round(w / ratio))
            left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
            out = f"{Path(file).stem}-{k}.png"
            img.crop((left, top, left + w, top + h)).save(src / out)
            rows.append({"file_name": out, "text": f"a photo of {Path(file).stem.replace('_', ' ')}"})
    write_metadata(src, rows)
    counts = prepare_folder(src, tmp / "mixed", size, keep_aspect=True)
    return tmp / "mixed", counts


def rates(out: Path, skip: int) -> tuple[float, dict]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    windows = [r["images_per_s"] for r in log if "images_per_s" in r and r["step"] > skip]
    buckets = next(({s: n for s, n in zip(r["sizes"], r["images"]) if n} for r in log if r.get("event") == "buckets"), None)
    return statistics.median(windows), buckets


def run(job: str, data: Path, tmp: Path, steps: int, buckets: bool) -> dict:
    on = f"data.buckets.enabled={str(buckets).lower()}"
    out = tmp / f"{job}-{'buckets' if buckets else 'square'}"
    common = [f"data.path={data}", "data.resolution=64", "data.eval_split=null", f"output_dir={out}", on, f"train.max_steps={steps}", "train.log_every=10",
              f"train.checkpoint_every={steps}", "train.sample_every=1000000"]  # fmt: skip
    if job == "stage2":
        from training.train_ldm import train

        vae = [f"model.vae={VAE}"] if (VAE / "config.json").is_file() else []  # else the config's (make demo trains it)
        cfg = load_config(LdmJobConfig, ROOT / "configs" / "ldm" / "openmoji-32.yaml",
                          [*common, *vae, "eval.num_prompts=0", "model.check_images=0", f"cache.dir={tmp / 'cache'}"])  # fmt: skip
    else:
        from training.train_autoencoder import train

        cfg = load_config(AutoencoderJobConfig, ROOT / "configs" / "autoencoder" / "openmoji-32-f4.yaml",
                          [*common, "extra_data=[]", "eval.ood=[]"])  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    speed, histogram = rates(out, 10)
    pixels = 64 * 64 if not histogram else sum(int(s.split("x")[0]) * int(s.split("x")[1]) * n for s, n in histogram.items()) / sum(histogram.values())
    return {"images_per_s": round(speed, 1), "pixels_per_image": round(pixels, 1), "wall_s": round(wall, 1), "buckets": histogram}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="stage-2 steps per run (batch 64)")
    p.add_argument("--ae-steps", type=int, default=200, help="stage-1 steps per run (batch 8)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    runtime.configure()
    from accelerate.state import AcceleratorState

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data, counts = mixed_set(tmp)
        print("mixed set:", json.dumps(counts))
        results = {"machine": machine(), "images": counts["train"], "set_buckets": counts["buckets"]}
        for job, steps in (("stage2", args.steps), ("stage1", args.ae_steps)):
            for buckets in (False, True):
                AcceleratorState._reset_state(True)  # each job as a new process would start
                results[f"{job}_{'buckets' if buckets else 'square'}"] = r = run(job, data, tmp, steps, buckets)
                print(job, "buckets" if buckets else "square", json.dumps(r))
    for job in ("stage2", "stage1"):
        results[f"{job}_ratio"] = round(results[f"{job}_buckets"]["images_per_s"] / results[f"{job}_square"]["images_per_s"], 3)
    print(json.dumps({k: v for k, v in results.items() if "ratio" in k}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
