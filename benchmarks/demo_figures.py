"""The figures of `make demo`, gathered from the runs it leaves: its last step writes them to
runs/demo-summary.json, and the README quotes a committed copy of a fresh clone's (docs/demo-summary.json).

    .venv/bin/python benchmarks/demo_figures.py --started runs/demo-started --json runs/demo-summary.json

Reads runs/autoencoder-openmoji-32-f4/ (metrics.json, log.jsonl) and runs/ldm-openmoji-32/ (metrics.json,
log.jsonl): the autoencoder's held-out and out-of-domain reconstruction figures beside its references, its running
held-out PSNR, the stage-2 loss curve and evaluation; each job's wall time (its first log record to its metrics.json),
images/s and the step count its time budget fixed; the precision each chose and why; the CPU and the package versions. ``--started``: a file holding the
time `make demo` started (``date +%s``), for the wall time of the whole command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import machine  # noqa: E402

AE, LDM = ROOT / "runs" / "autoencoder-openmoji-32-f4", ROOT / "runs" / "ldm-openmoji-32"
FIGURES = ("psnr", "lpips", "colour_error")


def _log(run: Path, key: str, steps: tuple[int, ...]) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {str(r["step"]): r[key] for r in records if key in r and r["step"] in steps}


def _round(entry: dict) -> dict:
    return {k: round(entry[k], 3) for k in FIGURES}


def _job(run: Path, metrics: dict) -> dict:
    """A job's wall time (its first log record, cache included, to its metrics.json) and mean logged images/s."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    budget = [r for r in records if r.get("event") == "budget"]  # train.max_minutes: the step count it fixed
    return {
        "budget": {k: budget[-1][k] for k in ("max_minutes", "seconds_per_step", "max_steps")} if budget else None,
        "wall_seconds": round((run / "metrics.json").stat().st_mtime - records[0]["time"], 1),
        "images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "mixed_precision": metrics["mixed_precision"],
        "precision_reason": metrics.get("precision_reason"),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "transformers", "accelerate", "datasets", "peft", "safetensors")}


def gather(seconds: float | None) -> dict:
    ae, ldm = json.loads((AE / "metrics.json").read_text()), json.loads((LDM / "metrics.json").read_text())
    references = {name: _round(ref) for name, ref in ae["references"].items()}
    return {
        "machine": machine(),
        "versions": versions(),
        "make_demo_seconds": seconds,
        "autoencoder": {
            "steps": ae["steps"],
            **_job(AE, ae),
            ae["split"]: _round(ae) | {"references": references},
            "ood": {
                name: _round(entry) | {"references": {ref: _round(v) for ref, v in entry.get("references", {}).items()}}
                for name, entry in ae["ood"].items()
            },
            "val_psnr": _log(AE, "val_psnr", (500, 1500, 2500, 3500, ae["steps"])),
        },
        "ldm": {
            "steps": ldm["steps"],
            **_job(LDM, ldm),
            "train_seconds": ldm["train_seconds_this_run"],
            "loss": _log(LDM, "loss", (400, 800, 1200, 1600, ldm["steps"])),
            "prompt_top1": ldm["eval"]["prompt_top1"],
            "fd_vgg": round(ldm["eval"]["fd_vgg"], 1),
            "fd_vgg_floor_real_sample": round(ldm["eval"]["fd_vgg_floor_real_sample"], 1),
            "fd_vgg_real_halves": round(ldm["eval"]["fd_vgg_real_halves"], 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--started", type=Path, default=None, help="a file with the time make demo started (date +%%s)")
    parser.add_argument("--seconds", type=float, default=None, help="or: the wall time of the whole make demo, as measured")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seconds = args.seconds
    if args.started is not None:
        seconds = round(time.time() - float(args.started.read_text()), 1)
    figures = gather(seconds)
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
