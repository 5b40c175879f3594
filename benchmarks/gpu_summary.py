"""The last step of benchmarks/gpu_check.sh: its runs gathered into one JSON (benchmarks/GPU_CHECK.json is a copy).

    python benchmarks/gpu_summary.py RUNS_DIR --stop-json RUNS_DIR/stop.json --json RUNS_DIR/GPU_CHECK.json

Reads RUNS_DIR/{ae,ldm,stop}/ (metrics.json, log.jsonl, the stop's checkpoint) and RUNS_DIR/gen-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
from importlib.metadata import version
from pathlib import Path


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _stage(run: Path) -> dict:
    metrics, log = json.loads((run / "metrics.json").read_text()), _log(run)
    speeds = [r["images_per_s"] for r in log if "images_per_s" in r]
    stage = {"steps": metrics["steps"], "batch_size": metrics["config"]["train"]["batch_size"],
             "mixed_precision": metrics["mixed_precision"], "precision_reason": metrics.get("precision_reason"),
             "images_per_s_median": statistics.median(speeds) if speeds else None}  # fmt: skip
    for key in ("psnr", "lpips", "train_seconds_this_run", "final_loss"):
        if key in metrics:
            stage[key] = metrics[key]
    return stage


def gather(runs: Path, stop: dict | None) -> dict:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        name = gpu.stdout.strip()
    except FileNotFoundError:
        name = ""
    log = _log(runs / "stop") if (runs / "stop" / "log.jsonl").is_file() else []
    stopped = [r["step"] for r in log if r.get("event") == "stopped"]
    resumed = [r["step"] for r in log if r.get("event") == "resume"]
    return {
        "machine": name or "no nvidia-smi",
        "versions": {n: version(n) for n in ("torch", "diffusers", "transformers", "accelerate")},
        "date": datetime.date.today().isoformat(),
        "command": "bash benchmarks/gpu_check.sh",
        "stage1": _stage(runs / "ae"),
        "stage2": _stage(runs / "ldm"),
        "sigterm_stop": {"stop_s": (stop or {}).get("stop_s"), "stopped_at_step": stopped[0] if stopped else None,
                         "resumed_from": resumed[0] if resumed else None},  # fmt: skip
        "generation_speed": {p.stem.removeprefix("gen-"): json.loads(p.read_text()) for p in sorted(runs.glob("gen-*.json"))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--stop-json", type=Path, default=None, help="the line benchmarks/measure_stop.py printed")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    stop = json.loads(args.stop_json.read_text()) if args.stop_json and args.stop_json.is_file() else None
    args.json.write_text(json.dumps(gather(args.runs, stop), indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
