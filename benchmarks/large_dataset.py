"""Stage 2 on datasets of growing size: peak memory, encode time, time to the first step (issues 14, 25).

    .venv/bin/python benchmarks/large_dataset.py [--images 5000 100000] [--processes 1] [--source parquet]
        [--captions long] [--vae f4-small | runs/autoencoder-openmoji-32-f4/vae] [--steps 30] [--json out.json] [--save]

For each size, an imagefolder of synthetic 32x32 images (random coloured rectangles) is written once under
``runs/bench-large/``, with one caption for all (``data.caption``) or, ``--captions long``, a caption of its own
per image of ~200 characters (as Hub datasets have); ``--source parquet`` / ``webdataset`` converts it once with
``training.prepare_data`` (the image files' bytes in the files). Then ``training.train_ldm`` runs
``configs/ldm/tiny.yaml`` on it with a tiny random autoencoder (or ``--vae``) and a frozen MiniLM text encoder
(so caption states are cached too), 30 steps, at the job's default ``cache.batch_size``, through ``accelerate launch``. Reported per size:
the peak RSS of the largest process of the command (``getrusage(RUSAGE_CHILDREN)``: the launcher,
or one rank), the seconds from launch to the run's start record (data check + latent-cache encode),
the encode alone (from the cache's ``key.json`` to its ``complete.json``, written by the first
process when the encode starts and when every shard exists) and its images per second, and the
seconds from launch to the first logged training step. ``--save`` writes the rows with the machine
to ``benchmarks/LARGE_DATASET.json``, which ``benchmarks/report.py`` puts into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "runs" / "bench-large"
BIN = Path(sys.executable).parent
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


WORDS = ("red green blue small large bright dark square box rectangle corner edge middle left right top bottom "
         "shape colour pattern drawn on a plain background with one shaded block near the").split()  # fmt: skip


def long_caption(rng: random.Random) -> str:
    """~200 characters, different for every image."""
    words = []
    while sum(len(w) + 1 for w in words) < 200:
        words.append(rng.choice(WORDS))
    return " ".join(words) + f" {rng.randrange(10**9)}"


def imagefolder(n: int, captions: str = "one") -> Path:
    """``n`` synthetic images (made once, then reused); ``captions="long"``: a metadata.jsonl with one each."""
    from PIL import Image, ImageDraw

    folder = OUT / (f"images-{n}" if captions == "one" else f"images-{n}-{captions}")
    if (folder / "train" / ".done").is_file():
        return folder
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rng, words = random.Random(n), random.Random(-n)  # the images do not depend on the captions
    rows = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(24), rng.randrange(24)
        ImageDraw.Draw(img).rectangle([x, y, x + rng.randrange(4, 12), y + rng.randrange(4, 12)], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(train / f"{i:06d}.png")
        if captions == "long":
            rows.append({"file_name": f"{i:06d}.png", "text": long_caption(words)})
    if captions == "long":
        (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (train / ".done").write_text("")
    return folder


def dataset(n: int, source: str, captions: str) -> Path:
    """The imagefolder, or its parquet / WebDataset conversion (made once)."""
    folder = imagefolder(n, captions)
    if source == "imagefolder":
        return folder
    converted = folder.with_name(f"{folder.name}-{source}")
    if not (converted / ".done").is_file():
        subprocess.run(["rm", "-rf", str(converted)], check=True)
        subprocess.run([sys.executable, "-m", "training.prepare_data", source, "--src", str(folder), "--out", str(converted)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        (converted / ".done").write_text("")
    return converted


def random_vae(preset: str = "tiny") -> Path:
    """A randomly initialised autoencoder of ``preset`` (``f4-small``: the default's architecture, so the same
    memory and encode time as a trained one, without a stage-1 run first)."""
    import torch

    from autoencoder import build_autoencoder, save_autoencoder

    torch.manual_seed(0)
    return save_autoencoder(build_autoencoder(preset, 32), OUT / ("vae" if preset == "tiny" else f"vae-{preset}"))


def run(n: int, processes: int, vae: Path, source: str = "imagefolder", captions: str = "one", steps: int = 30) -> dict:
    data = dataset(n, source, captions)
    out = OUT / f"run-{n}-{processes}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    caption = ["data.caption=a coloured rectangle"] if captions == "one" else []
    cmd = [str(BIN / "accelerate"), "launch", *(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
           "-m", "training.train_ldm", "--config", "configs/ldm/tiny.yaml", f"data.path={data}", *caption,
           f"model.vae={vae}", "model.text_encoder=minilm", "model.check_images=0", f"output_dir={out}", f"train.max_steps={steps}",
           f"train.checkpoint_every={steps}", "train.log_every=1", "train.sample_every=1000"]  # fmt: skip
    started = time.time()
    peak = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=ROOT, check=True, capture_output=True, text=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r.get("event") == "start")
    first = next(r for r in log if "loss" in r)
    encode_s = encode_seconds(out)
    return {"images": n, "processes": processes, "source": source, "captions": captions, "vae": str(vae.relative_to(ROOT) if vae.is_relative_to(ROOT) else vae), "peak_rss_mib": round(int(peak.stdout.strip().splitlines()[-1]) / 1024, 1),
            "launch_to_start_s": round(start["time"] - started, 1), "images_per_s_to_start": round(n / (start["time"] - started), 1),
            "encode_s": round(encode_s, 1), "encode_images_per_s": round(n / encode_s, 1),
            "launch_to_first_step_s": round(first["time"] - started, 1)}  # fmt: skip


def encode_seconds(out: Path) -> float:
    (folder,) = [p for p in (out / "latent-cache").iterdir() if p.is_dir()]
    return (folder / "complete.json").stat().st_mtime - (folder / "key.json").stat().st_mtime


def save(rows: list[dict], args: argparse.Namespace) -> Path:
    """The rows, the machine and the command into LARGE_DATASET.json (imagefolders) or LARGE_DATASET-<source>.json."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import machine

    path = ROOT / "benchmarks" / ("LARGE_DATASET.json" if args.source == "imagefolder" else f"LARGE_DATASET-{args.source}.json")
    vae = f"the autoencoder `{args.vae}`" if Path(args.vae).is_dir() else f"a random autoencoder of preset {args.vae}"
    captions = "one caption for all" if args.captions == "one" else "a ~200-character caption of its own per image"
    setup = (f"Stage 2 (`configs/ldm/tiny.yaml`, {vae}, frozen MiniLM captions cached, {args.steps} steps) on synthetic 32x32 "
             f"images ({captions}) as {args.source}")  # fmt: skip
    record = {"machine": machine(), "source": args.source, "setup": setup, "command": " ".join(["benchmarks/large_dataset.py", *sys.argv[1:]]), "rows": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[5000, 100000])
    p.add_argument("--processes", type=int, nargs="+", default=[1])
    p.add_argument("--source", choices=["imagefolder", "parquet", "webdataset"], default="imagefolder")
    p.add_argument("--captions", choices=["one", "long"], default="one", help="long: a ~200-character caption per image")
    p.add_argument("--vae", default="tiny", help="a vae/ folder, or a preset for a random one of it (tiny, default; f4-small: the default's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--save", action="store_true", help="write the rows with the machine to benchmarks/LARGE_DATASET.json")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    vae = Path(args.vae) if Path(args.vae).is_dir() else random_vae(args.vae)
    rows = []
    for n in args.images:
        for k in args.processes:
            rows.append(run(n, k, vae, args.source, args.captions, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": rows}, indent=2))
    if args.save:
        print(f"saved to {save(rows, args)}")


if __name__ == "__main__":
    main()
