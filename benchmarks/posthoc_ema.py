"""Post-hoc EMA on a stage-2 run (issue 28): which EMA length the snapshots' reconstructions score best, beside the
run's trained weights, and what tracking them cost.

    .venv/bin/python benchmarks/stage2_recipes.py --minutes 60 --only "default (coarse-attn), post-hoc EMA snapshots"
    .venv/bin/python benchmarks/posthoc_ema.py --variant "default (coarse-attn), post-hoc EMA snapshots" [--reuse] [--save]

Runs ``python -m training.posthoc_ema --run runs/recipes/<variant> --sweep`` (the run's own evaluation: 100 training
captions, 25 DPM++ steps, the config's guidance, seed 0; ``--reuse``: the sweep already written) and prints its table,
with the snapshots' disk and what tracking costs, timed alone on the run's U-Net (:func:`tracking_cost`). ``--save``
adds it to ``benchmarks/POSTHOC_EMA.json``, which ``benchmarks/report.py`` renders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from stage2_recipes import OUT, slug  # noqa: E402

from training.posthoc_ema import sweep_table  # noqa: E402

SAVED = HERE / "POSTHOC_EMA.json"


def measure(variant: str, reuse: bool = False) -> dict:
    run, out = OUT / slug(variant), OUT / f"{slug(variant)}-posthoc"
    cmd = [sys.executable, "-m", "training.posthoc_ema", "--run", str(run), "--sweep", "--out", str(out)]
    if not (reuse and (out / "posthoc-sweep.json").is_file()):
        subprocess.run(cmd, cwd=ROOT, check=True)
    table = json.loads((out / "posthoc-sweep.json").read_text())
    snapshots = sorted((run / "ema-snapshots").glob("*.safetensors"))
    shown = ["--run", str(run.relative_to(ROOT)), "--sweep", "--out", str(out.relative_to(ROOT))]
    record = {"variant": variant, "command": " ".join(["python -m training.posthoc_ema", *shown]), **table,
              "snapshots": len(snapshots), "snapshot_mib": round(sum(p.stat().st_size for p in snapshots) / 2**20),
              "train_seconds": json.loads((run / "metrics.json").read_text())["train_seconds_this_run"]}  # fmt: skip
    record["tracking"] = tracking_cost(run)
    return record


def tracking_cost(run: Path, steps: int = 20) -> dict:
    """What the tracking adds, timed alone on the run's U-Net: one step of both profiles (ms, median of ``steps``) and
    one snapshot of both (s), beside a training step of the run (its log's median images/s)."""
    import statistics
    import tempfile
    import time

    import torch

    from training.run.posthoc_ema import PowerEMA
    from training.stage2.models import load_models
    from training.posthoc_ema import run_config

    cfg = run_config(run)
    unet = load_models(cfg).unet
    params = [p for p in unet.parameters()]
    names = [n for n, _ in unet.named_parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        ema = PowerEMA(params, names, cfg.train.ema.sigma_rels, tmp, every=10**9)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            ema.step(params)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ema.snapshot()
        snapshot_s = time.perf_counter() - start
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    per_s = statistics.median(r["images_per_s"] for r in log if "images_per_s" in r)
    return {"step_ms": round(1000 * statistics.median(times), 1), "snapshot_s": round(snapshot_s, 2),
            "train_step_ms": round(1000 * cfg.train.batch_size / per_s, 1), "parameters": sum(p.numel() for p in params),
            "threads": torch.get_num_threads()}  # fmt: skip


def load() -> list[dict]:
    return json.loads(SAVED.read_text())["sweeps"] if SAVED.is_file() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", required=True, help="a variant of benchmarks/stage2_recipes.py trained with train.ema.kind=posthoc")
    p.add_argument("--save", action="store_true", help="add the record to benchmarks/POSTHOC_EMA.json")
    p.add_argument("--reuse", action="store_true", help="use the sweep already written for this run (runs/recipes/<variant>-posthoc)")
    args = p.parse_args()
    record = measure(args.variant, args.reuse)
    if args.save:
        from report import machine

        record["machine"] = machine()
        SAVED.write_text(json.dumps({"sweeps": [s for s in load() if s["variant"] != args.variant] + [record]}, indent=2))
    print(sweep_table(record))


if __name__ == "__main__":
    main()
