"""Stage-1 ablations at equal wall-clock time, in domain and out of domain (issue 12).

    .venv/bin/python benchmarks/autoencoder_ablations.py [--budget 180] [--only NAME ...] [--table]

Each variant is ``configs/autoencoder/openmoji-32-f4.yaml`` plus overrides. A 40-step probe of the
variant (in its own process, as the run) measures its seconds per step, with the GAN (or, for a
``loss.perceptual_start`` given as a fraction of the run, the LPIPS term) on from step 20; the run
then gets as many steps as fit in ``--budget`` seconds of training (the GAN starting at the
config's fraction of the run, 1700/2200). Every run is scored by
its own export (``metrics.json``): the OpenMoji held-out split and the two out-of-domain sets of
``make data`` (``data/ood-32/photos``, ``data/ood-32/glyphs``), each beside bicubic resizing and a
PCA of the latent's size fitted on the run's own training split. Rows are appended to
``runs/ablations/results.jsonl`` as each run ends (an interrupted sweep keeps its rows; a variant
run again replaces its row); ``--save`` writes them with the machine to
``benchmarks/AUTOENCODER_ABLATIONS.json`` as one sweep (the sweeps of other days and machines stay
there, each with its own machine: rows are compared only within a sweep), which
``benchmarks/report.py`` renders into RESULTS.md.
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
    # second sweep, from the new default (no GAN, LPIPS 0.1, + generic data): optimiser and LPIPS schedule
    "default recipe": [*NO_GAN, *MIX],
    "default, Adam betas (0.9, 0.999)": [*NO_GAN, *MIX, "train.adam_beta1=0.9", "train.adam_beta2=0.999"],
    "default, LR 2e-3": [*NO_GAN, *MIX, "train.lr=2e-3"],
    "default, LPIPS from 60% (L1 only before)": [*NO_GAN, *MIX, "loss.perceptual_start=0.6"],
}


def job(out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "training.train_autoencoder", "--config", str(CONFIG), *BASE, f"output_dir={out}",
            f"eval.ood=[{','.join(OOD)}]", "train.sample_every=1000000", *overrides]  # fmt: skip


def seconds_per_step(log: Path, key: str = "g_loss") -> dict[str, float]:
    """Median seconds per step before and after the term logged as ``key`` switched on (the GAN:
    ``g_loss`` appears; LPIPS: ``lpips`` becomes non-zero), from log.jsonl's times."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    pairs = [((b["time"] - a["time"]) / (b["step"] - a["step"]), bool(b.get(key))) for a, b in zip(rows, rows[1:])]
    out = {}
    for on in (False, True):
        values = sorted(v for v, g in pairs if g == on)
        if values:
            out["on" if on else "off"] = values[len(values) // 2]
    return out


def run_variant(name: str, overrides: list[str], budget: float) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    gan = not any(o == "loss.disc_weight=0" for o in overrides)
    # loss.perceptual_start=FRACTION (< 1): LPIPS switches on at that fraction of the run's steps
    lpips_from = next((float(o.split("=")[1]) for o in overrides if o.startswith("loss.perceptual_start=")), None)
    overrides = [o for o in overrides if not o.startswith("loss.perceptual_start=")]
    probe_dir = OUT / f"{slug}-probe"
    subprocess.run(["rm", "-rf", str(probe_dir)], check=True)
    probe = [*overrides, "train.max_steps=40", "train.log_every=5", "loss.disc_start=20", "train.checkpoint_every=1000",
             "train.lr_warmup_steps=4", "eval.max_images=1", *(["loss.perceptual_start=20"] if lpips_from else [])]  # fmt: skip
    subprocess.run(job(probe_dir, probe), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    speed = seconds_per_step(probe_dir / "log.jsonl", "lpips" if lpips_from else "g_loss")
    on_fraction = 1 - lpips_from if lpips_from else (2200 - 1700) / 2200 if gan else 0.0
    per_step = (1 - on_fraction) * speed["off"] + on_fraction * speed.get("on", speed["off"])
    steps = int(budget / per_step)
    out = OUT / slug
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = job(out, [*overrides, f"train.max_steps={steps}", f"loss.disc_start={round(steps * 1700 / 2200)}",
                    f"train.checkpoint_every={steps}", "train.log_every=50",
                    *([f"loss.perceptual_start={round(steps * lpips_from)}"] if lpips_from else [])])  # fmt: skip
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


SAVED = ROOT / "benchmarks" / "AUTOENCODER_ABLATIONS.json"


def load_sweeps() -> list[dict]:
    """The saved sweeps, oldest first (a file with one top-level sweep is read as a list of one)."""
    if not SAVED.is_file():
        return []
    record = json.loads(SAVED.read_text())
    return record["sweeps"] if "sweeps" in record else [record]


def save_sweep(sweep: dict) -> None:
    """Add ``sweep`` to the saved ones; a re-save (same day, CPU and variants) replaces its earlier copy."""
    key = lambda s: (s["machine"]["date"], s["machine"]["CPU"], sorted(r["name"] for r in s["rows"]))  # noqa: E731
    sweeps = [s for s in load_sweeps() if key(s) != key(sweep)] + [sweep]
    SAVED.write_text(json.dumps({"sweeps": sweeps}, indent=2))


def machine_record() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import machine

    return machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per variant")
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--table", action="store_true", help="print the table of runs/ablations/results.jsonl and stop")
    p.add_argument("--save", action="store_true", help="write runs/ablations/results.jsonl (the --only rows) to benchmarks/AUTOENCODER_ABLATIONS.json "
                   "as this machine's sweep of today, and stop")
    args = p.parse_args()
    results = OUT / "results.jsonl"
    if args.table or args.save:
        rows = {}
        for line in results.read_text().splitlines():  # a variant run again replaces its row, in its first place
            row = json.loads(line)
            rows[row["name"]] = row
        if args.only is not None:  # one sweep's rows (results.jsonl also keeps the rows of earlier sweeps)
            rows = {k: v for k, v in rows.items() if k in args.only}
        if args.save:
            save_sweep({"machine": machine_record(), "budget_seconds": args.budget, "rows": list(rows.values())})
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
