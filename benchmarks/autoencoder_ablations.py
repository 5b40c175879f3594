"""Stage-1 ablations at equal wall-clock time, in domain and out of domain (issue 12).

    .venv/bin/python benchmarks/autoencoder_ablations.py [--budget 180] [--only NAME ...] [--table]

Each variant is ``configs/autoencoder/openmoji-32-f4.yaml`` plus overrides. A 40-step probe of the
variant (in its own process, as the run) measures its seconds per step, with the GAN on from step
20 where the variant has one; the run then gets as many steps as fit in ``--budget`` seconds of
training (the GAN starting at the config's fraction of the run, 1700/2200). Every run is scored by
its own export (``metrics.json``): the OpenMoji held-out split and the two out-of-domain sets of
``make data`` (``data/ood-32/photos``, ``data/ood-32/glyphs``), each beside bicubic resizing and a
PCA of the latent's size fitted on the run's own training split. Rows are appended to
``runs/ablations/results.jsonl`` as each run ends (an interrupted sweep keeps its rows; a variant
run again replaces its row); ``--save`` writes them with the machine to
``benchmarks/AUTOENCODER_ABLATIONS.json``, which ``benchmarks/report.py`` renders into RESULTS.md.
A full sweep takes about 4 minutes per variant (probe, run, export and evaluation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "autoencoder" / "openmoji-32-f4.yaml"
OUT = ROOT / "runs" / "ablations"
OOD = ["data/ood-32/photos", "data/ood-32/glyphs"]
BASE = ["model.preset=f4-small", "data.path=data/openmoji-32", "extra_data=[]", "loss.disc_weight=0.5",
        "loss.perceptual_weight=1.0", "loss.l1_weight=1.0", "loss.mse_weight=0", "loss.kl_weight=1e-6", "train.batch_size=8",
        "train.lr=1e-3", "train.ema_decay=null"]  # the issue-12 starting point, whatever the config now holds  # fmt: skip
NO_GAN = ["loss.disc_weight=0", "loss.perceptual_weight=0.1"]
MIX = ["extra_data=[data/generic-32]"]
VARIANTS: dict[str, list[str]] = {  # name: overrides on top of BASE
    "old default: GAN from 77%, LPIPS 1": [],
    "no GAN, LPIPS 0.1": NO_GAN,
    "no GAN, LPIPS 0.1, + generic data": [*NO_GAN, *MIX],
    "GAN from 77%, LPIPS 0.1, + generic data": ["loss.perceptual_weight=0.1", *MIX],
    "no GAN, LPIPS 1": ["loss.disc_weight=0"],
    "no GAN, LPIPS 0 (L1 only)": ["loss.disc_weight=0", "loss.perceptual_weight=0"],
    "no GAN, LPIPS 0.1, L2 instead of L1": [*NO_GAN, "loss.l1_weight=0", "loss.mse_weight=1"],
    "no GAN, LPIPS 0.1, KL 1e-4": [*NO_GAN, "loss.kl_weight=1e-4"],
    "no GAN, LPIPS 0.1, EMA 0.999": [*NO_GAN, "train.ema_decay=0.999"],
    "no GAN, LPIPS 0.1, batch 16, LR 2e-3": [*NO_GAN, "train.batch_size=16", "train.lr=2e-3"],
    "no GAN, LPIPS 0.1, f4-narrow": [*NO_GAN, "model.preset=f4-narrow"],
    "no GAN, LPIPS 0.1, GroupNorm 8 groups": [*NO_GAN, "model.norm_num_groups=8"],
    "no GAN, LPIPS 0.1, 8 latent channels": [*NO_GAN, "model.latent_channels=8"],
    "no GAN, LPIPS 0.1, batch 32, LR 2e-3": [*NO_GAN, "train.batch_size=32", "train.lr=2e-3"],
    "no GAN, LPIPS 0.1, + 1200 generic (25%)": [*NO_GAN, "extra_data=[data/generic-32-1200]"],
}


def job(out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "training.train_autoencoder", "--config", str(CONFIG), *BASE, f"output_dir={out}",
            f"eval.ood=[{','.join(OOD)}]", "train.sample_every=1000000", *overrides]  # fmt: skip


def seconds_per_step(log: Path) -> dict[str, float]:
    """Median seconds per step before and after the GAN switched on, from log.jsonl's times."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    pairs = [((b["time"] - a["time"]) / (b["step"] - a["step"]), "g_loss" in b) for a, b in zip(rows, rows[1:])]
    out = {}
    for gan in (False, True):
        values = sorted(v for v, g in pairs if g == gan)
        if values:
            out["gan" if gan else "plain"] = values[len(values) // 2]
    return out


def run_variant(name: str, overrides: list[str], budget: float) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    gan = not any(o == "loss.disc_weight=0" for o in overrides)
    probe_dir = OUT / f"{slug}-probe"
    subprocess.run(["rm", "-rf", str(probe_dir)], check=True)
    subprocess.run(job(probe_dir, [*overrides, "train.max_steps=40", "train.log_every=5", "loss.disc_start=20", "train.checkpoint_every=1000",
                                   "train.lr_warmup_steps=4", "eval.max_images=1"]), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    speed = seconds_per_step(probe_dir / "log.jsonl")
    gan_fraction = (2200 - 1700) / 2200 if gan else 0.0
    per_step = (1 - gan_fraction) * speed["plain"] + gan_fraction * speed.get("gan", speed["plain"])
    steps = int(budget / per_step)
    out = OUT / slug
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = job(out, [*overrides, f"train.max_steps={steps}", f"loss.disc_start={round(steps * 1700 / 2200)}",
                    f"train.checkpoint_every={steps}", "train.log_every=50"])  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [r for r in log if "images_per_s" in r]
    m = json.loads((out / "metrics.json").read_text())
    row = {"name": name, "overrides": overrides, "steps": steps, "train_seconds": round(trained[-1]["time"] - log[0]["time"], 1),
           "in": _figures(m), **{f"ood_{k}": _figures(v) for k, v in m.get("ood", {}).items()}}  # fmt: skip
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _figures(m: dict) -> dict:
    refs = m["references"]
    pca = next((v for k, v in refs.items() if k.startswith("pca")), None)
    bic = next(v for k, v in refs.items() if k.startswith("bicubic"))
    return {"psnr": round(m["psnr"], 2), "lpips": round(m["lpips"], 4), "colour": round(m["colour_error"], 2),
            "pca_psnr": None if pca is None else round(pca["psnr"], 2), "bicubic_psnr": round(bic["psnr"], 2)}  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("| variant | steps | train s | OpenMoji held-out PSNR / LPIPS / colour (PCA) | photos PSNR / colour (PCA, bicubic) "
            "| glyphs PSNR / colour (PCA, bicubic) |\n|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        i, p, g = r["in"], r.get("ood_photos"), r.get("ood_glyphs")
        ood = lambda d: f"{d['psnr']:.2f} / {d['colour']:.1f} ({d['pca_psnr']:.1f}, {d['bicubic_psnr']:.1f})" if d else "-"  # noqa: E731
        lines.append(f"| {r['name']} | {r['steps']} | {r['train_seconds']:.0f} | {i['psnr']:.2f} / {i['lpips']:.3f} / {i['colour']:.1f} "
                     f"({i['pca_psnr']:.1f}) | {ood(p)} | {ood(g)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per variant")
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--table", action="store_true", help="print the table of runs/ablations/results.jsonl and stop")
    p.add_argument("--save", action="store_true", help="write runs/ablations/results.jsonl to benchmarks/AUTOENCODER_ABLATIONS.json and stop")
    args = p.parse_args()
    results = OUT / "results.jsonl"
    if args.table or args.save:
        rows = {}
        for line in results.read_text().splitlines():  # a variant run again replaces its row, in its first place
            row = json.loads(line)
            rows[row["name"]] = row
        if args.save:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from report import machine

            record = {"machine": machine(), "budget_seconds": args.budget, "rows": list(rows.values())}
            (ROOT / "benchmarks" / "AUTOENCODER_ABLATIONS.json").write_text(json.dumps(record, indent=2))
        print(table(list(rows.values())))
        return
    for d in ["data/openmoji-32/train", "data/generic-32/train", *OOD]:
        if not (ROOT / d).is_dir():
            sys.exit(f"{d} is missing: run `make data` first")
    if not (ROOT / "data/generic-32-1200/train").is_dir():  # the smaller mix of one variant
        subprocess.run([sys.executable, "-m", "training.prepare_data", "generic", "--size", "32", "--count", "1200",
                        "--out", "data/generic-32-1200"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    for name, overrides in VARIANTS.items():
        if args.only is None or name in args.only:
            row = run_variant(name, overrides, args.budget)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
