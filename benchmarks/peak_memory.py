"""Peak memory (resident set size) of each job at its default settings, each in its own process.

    .venv/bin/python benchmarks/peak_memory.py [--json out.json]

Needs ``data/openmoji-32`` (``make data``). Runs the README's commands with the shipped configs, only
shortened (a few dozen steps: the peak is reached in the first steps and at export):
stage 1 (``configs/autoencoder/openmoji-32-f4.yaml``, with the GAN switched on half-way so both phases
run), stage 2 (``configs/ldm/openmoji-32.yaml`` on that autoencoder, building its latent cache, with
the end-of-run evaluation on 20 prompts), a LoRA fine-tune (``configs/finetune/lora-openmoji.yaml``
on that pipeline), and ``ldm.generate`` as ``make demo`` calls it (5 prompts x 6 images, one grid).
The peak is the largest RSS of the command's process tree (``getrusage(RUSAGE_CHILDREN)``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "openmoji-32"
BIN = Path(sys.executable).parent
PROMPTS = ["red apple", "grinning face", "sun", "red heart", "rocket"]
# Run `cmd` in a child and print the peak RSS (KiB on Linux) of everything it waited for.
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=ROOT, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def train(module: str, config: str, *overrides: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "1", "-m", module, "--config", config, *overrides]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (DATA / "train" / "metadata.jsonl").is_file():
        sys.exit(f"{DATA} is missing: run `make data` first")
    with tempfile.TemporaryDirectory() as tmp:
        ae, ldm, lora = Path(tmp) / "ae", Path(tmp) / "ldm", Path(tmp) / "lora"
        short = ["train.sample_every=1000000", "train.log_every=10"]
        jobs = {
            "stage 1: train_autoencoder (batch 8)": train(
                "training.train_autoencoder", "configs/autoencoder/openmoji-32-f4.yaml", f"output_dir={ae}",
                "train.max_steps=40", "loss.disc_start=20", "train.checkpoint_every=40", *short),
            "stage 2: train_ldm (batch 64, latent cache)": train(
                "training.train_ldm", "configs/ldm/openmoji-32.yaml", f"output_dir={ldm}", f"model.vae={ae / 'vae'}",
                "train.max_steps=30", "train.checkpoint_every=30", "eval.num_prompts=20", *short),
            "fine-tune: LoRA (batch 8)": train(
                "training.train_ldm", "configs/finetune/lora-openmoji.yaml", f"output_dir={lora}", f"model.init_from={ldm / 'pipeline'}",
                f"data.path={DATA}", "data.split=test", "train.max_steps=30", "train.checkpoint_every=30", *short),
            "generation: ldm.generate (30 images)": [
                sys.executable, "-m", "ldm.generate", "--model", str(ldm / "pipeline"), *[a for q in PROMPTS for a in ("--prompt", q)],
                "--num-images", "6", "--grid", "--out", str(Path(tmp) / "grid.png")],
        }  # fmt: skip
        results = {name: round(peak_mib(cmd)) for name, cmd in jobs.items()}
    print(f"{'job (default settings)':<46}{'peak RSS':>10}")
    for name, mib in results.items():
        print(f"{name:<46}{mib:>7} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
