"""Autoencoder training: this project's recipe (the default config's: L1 + LPIPS 0.1 + KL, the GAN as the
config sets it) vs a plain-VAE baseline (MSE + KL: no LPIPS, no GAN) with the same network, data,
batch and LR, at equal wall-clock time.

    .venv/bin/python benchmarks/autoencoder_recipe.py [--steps 900] [--json out.json]

Needs ``data/openmoji-32`` (``make data``). Our recipe runs ``configs/autoencoder/openmoji-32-f4.yaml``
shortened to --steps (a GAN, if the config has one, starting at the same fraction of the run); its training
time, read from its log, is the budget. A 40-step probe of the baseline measures its seconds per step,
and the baseline then runs as many steps as fit in the same budget. Both are scored by their own
export on the held-out split (201 images): PSNR and LPIPS (VGG, lower is better).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "autoencoder" / "openmoji-32-f4.yaml"
DATA = ROOT / "data" / "openmoji-32"
BASELINE = ["loss.l1_weight=0", "loss.mse_weight=1", "loss.perceptual_weight=0", "loss.disc_weight=0"]


def run(out: Path, steps: int, overrides: list[str]) -> dict:
    """One training job in its own process; returns its training seconds, s/step and held-out metrics."""
    cmd = [sys.executable, "-m", "training.train_autoencoder", "--config", str(CONFIG), f"output_dir={out}", f"data.path={DATA}",
           f"train.max_steps={steps}", "train.log_every=10", f"train.checkpoint_every={steps}", "train.sample_every=1000000",
           f"train.lr_warmup_steps={min(100, steps // 10)}", *overrides]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_logged = [r for r in log if "images_per_s" in r]
    seconds_per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(steps_logged, steps_logged[1:])]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"steps": steps, "train_seconds": round(steps_logged[-1]["time"] - log[0]["time"], 1),
            "seconds_per_step": statistics.median(seconds_per_step),
            "psnr": round(metrics["psnr"], 2), "lpips": round(metrics["lpips"], 4), "ssim": round(metrics["ssim"], 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=900, help="our recipe's steps (the config's 2,200 take ~5 min)")
    p.add_argument("--keep-vae", type=Path, default=None, help="copy our recipe's exported vae/ folder here (make bench's stage-2 benchmark uses it)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (DATA / "train" / "metadata.jsonl").is_file():
        sys.exit(f"{DATA} is missing: run `make data` first")
    import yaml

    loss = yaml.safe_load(CONFIG.read_text())["loss"]
    max_steps = yaml.safe_load(CONFIG.read_text())["train"]["max_steps"]
    disc_start = round(args.steps * loss.get("disc_start", 0) / max_steps)  # the config's GAN start, as a fraction of the run
    with tempfile.TemporaryDirectory() as tmp:
        ours = run(Path(tmp) / "ours", args.steps, [f"loss.disc_start={disc_start}"])
        if args.keep_vae:
            shutil.copytree(Path(tmp) / "ours" / "vae", args.keep_vae, dirs_exist_ok=True)
        probe = run(Path(tmp) / "probe", 40, BASELINE)
        base_steps = round(ours["train_seconds"] / probe["seconds_per_step"])
        baseline = run(Path(tmp) / "baseline", base_steps, BASELINE)
    results = {"ours": ours, "baseline": baseline, "lpips_ratio": baseline["lpips"] / ours["lpips"]}
    print(f"\n{'recipe':<36}{'steps':>7}{'train s':>9}{'PSNR dB':>9}{'LPIPS':>8}")
    for name, r in (("ours (default config)", ours), ("MSE + KL (plain VAE)", baseline)):
        print(f"{name:<36}{r['steps']:>7}{r['train_seconds']:>9.0f}{r['psnr']:>9.2f}{r['lpips']:>8.4f}")
    print(f"LPIPS: ours {ours['lpips']:.4f} vs baseline {baseline['lpips']:.4f} ({results['lpips_ratio']:.2f}x lower)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
