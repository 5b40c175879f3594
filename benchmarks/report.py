"""Run every side-by-side benchmark, each in its own process, and write ``benchmarks/RESULTS.md``.

    make bench        # = .venv/bin/python benchmarks/report.py  (about 15-20 minutes on a 2-core CPU)

RESULTS.md (and RESULTS.json, the raw figures) gets the machine (CPU model, cores, torch version), each command, its figures, the
targets of issue 6 next to what was measured, and ``benchmarks/NOTES.md`` (where the time goes and
what each speed change moved, predicted vs measured). Absolute times drift on shared machines:
the ratios, each measured within one process, are the figures to compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BENCHMARKS = [  # (script, arguments, title); {tmp} is a scratch folder shared by the run
    ("generation_speed.py", ["--compile"], "1. Generation: this pipeline vs diffusers' StableDiffusionPipeline (fp32)"),
    ("autoencoder_recipe.py", ["--keep-vae", "{tmp}/vae"], "3. Autoencoder training: the default recipe vs MSE + KL at equal time"),
    ("training_throughput.py", ["--vae", "{tmp}/vae"], "2. Latent-model training: train_ldm vs the per-step-encode fp32 recipe"),
    ("latent_vs_pixel.py", [], "4. Latent vs pixel space: one 64x64 image"),
    ("unet_hardware.py", [], "5. Hardware use: U-Net FLOP/s vs the matrix-product rate"),
    ("peak_memory.py", [], "6. Peak memory of each job"),
]  # 3 runs before 2: stage 2 trains on the autoencoder that benchmark 3 trained (no dependence on runs/)
NOISE = re.compile(r"^(saved |Loading|Writing|model: )|it/s\]|s/it\]|^\s*$")


def machine() -> dict[str, str]:
    import diffusers
    import torch

    from runtime import cpu_bf16_speedup

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0] if names else cpu
    return {"CPU": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "bf16 conv speed-up (probe)": f"{cpu_bf16_speedup():.2f}x", "CUDA": str(torch.cuda.is_available()),
            "date": datetime.date.today().isoformat()}  # fmt: skip


def run(script: str, args: list[str], json_path: Path) -> tuple[dict, str, float]:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(json_path)]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    text = "\n".join(line for line in out.splitlines() if not NOISE.search(line))
    return json.loads(json_path.read_text()), text, time.perf_counter() - start


def targets(r: dict) -> list[tuple[str, str, str, bool]]:
    """(target, measured, how, met) for issue 6's targets."""
    gen, train, ae, hw = r["generation_speed.py"], r["training_throughput.py"], r["autoencoder_recipe.py"], r["unet_hardware.py"]
    bf16 = hw["forward"]["bf16"]
    return [
        ("generation >= 2.5x diffusers fp32, PSNR >= 30 dB",
         f"{gen['ours_default_speedup']:.2f}x at defaults, PSNR {gen['ours_default_psnr_db']:.1f} dB; "
         f"compile=True {gen.get('ours_compile_speedup', float('nan')):.2f}x", "benchmark 1",
         gen["ours_default_speedup"] >= 2.5 and gen["ours_default_psnr_db"] >= 30),
        ("train_ldm steady state >= 3x the per-step-encode fp32 recipe",
         f"{train['ratio']:.2f}x ({train['ours']['images_per_s']:.0f} vs {train['baseline']['images_per_s']:.0f} images/s); "
         f"time to loss {train['target_loss']:.3f}: {train['time_ratio']:.2f}x", "benchmark 2", train["ratio"] >= 3),
        ("autoencoder recipe: lower LPIPS than MSE + KL at equal time",
         f"LPIPS {ae['ours']['lpips']:.3f} vs {ae['baseline']['lpips']:.3f} "
         f"({ae['ours']['train_seconds']:.0f} s vs {ae['baseline']['train_seconds']:.0f} s)", "benchmark 3",
         ae["ours"]["lpips"] < ae["baseline"]["lpips"]),
        ("U-Net forward >= 25% of the bf16 matrix-product rate",
         f"{bf16['of_bf16_matmul']:.0%} ({bf16['gflops']:.0f} of {hw['matmul_gflops']['bf16']:.0f} GFLOP/s)", "benchmark 5",
         bf16["of_bf16_matmul"] >= 0.25),
    ]  # fmt: skip


def render(record: dict) -> str:
    results = {script: b["results"] for script, b in record["benchmarks"].items()}
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`benchmarks/report.py`) in {record['minutes']:.1f} minutes. Each comparison runs in one "
             "process on one machine; absolute times drift on shared VMs, the ratios are the figures to compare.", "",
             "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in record["machine"].items()], "",
             "## Targets (issue 6)", "", "| target | measured | where | met |", "|---|---|---|---|",
             *[f"| {t} | {m} | {w} | {'yes' if ok else '**no**: see the notes below'} |" for t, m, w, ok in targets(results)], ""]  # fmt: skip
    for b in sorted(record["benchmarks"].values(), key=lambda b: b["title"]):
        lines += [f"## {b['title']}", "", f"`{b['command']}` ({b['minutes']:.1f} min)", "", "```", b["text"], "```", ""]
    sys.path.insert(0, str(HERE))
    from autoencoder_ablations import load_sweeps, table

    sweeps = load_sweeps()  # written by autoencoder_ablations.py --save (about an hour: not part of make bench)
    if sweeps:
        lines += ["## Stage-1 ablations at equal wall-clock (issue 12)", "",
                  "Each variant trains for the same seconds; PCA is fitted on the variant's own training split (OpenMoji, or "
                  "OpenMoji + the generic set), bicubic is area-down to 9x9x3 and back. Colour error: mean absolute difference "
                  "of 8x8-block means, 0-255 levels. Compare rows only within one sweep (one machine, one day). See NOTES.md "
                  "for what each row moved.", ""]  # fmt: skip
    for i, ab in enumerate(sweeps, 1):
        lines += [f"### Sweep {i}: {machine_line(ab['machine'])}", "",
                  f"`.venv/bin/python benchmarks/autoencoder_ablations.py --budget {ab['budget_seconds']:.0f} --only ...` then `--save`", "",
                  table(ab["rows"]), ""]  # fmt: skip
    lines += stage2_recipes_section()
    lines += posthoc_ema_section()
    for path in sorted(HERE.glob("LARGE_DATASET*.json")):  # LARGE_DATASET.json: imagefolders; -parquet, -webdataset
        lines += large_dataset_section(path)
    notes = HERE / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text()]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    """A sweep's machine, as its heading names it: CPU, cores, bf16 probe, date."""
    return f"{m['CPU']} ({m['cores']} cores, bf16 conv probe {m['bf16 conv speed-up (probe)']}), {m['date']}"


def stage2_recipes_section() -> list[str]:
    """The sweeps of ``benchmarks/stage2_recipes.py --save`` (about 10 minutes a variant: not part of make bench)."""
    from stage2_recipes import load_sweeps, table

    sweeps = load_sweeps()
    if not sweeps:
        return []
    lines = ["## Stage-2 recipes at equal wall-clock (issue 26)", "",
             "Each variant of `configs/ldm/openmoji-32.yaml` trains for the same minutes of its loop (`train.max_minutes`), on "
             "the default autoencoder, and is scored on 100 training captions and on the same captions reworded in sentences "
             "no caption has (`--captions unseen`), at 25 and 8 DPM++ steps, guidance 3: prompt top-1 among 20 (chance 0.05) "
             "and FD-VGG (floor: 100 real images vs the rest; autoencoder floor: the same 100 encoded and decoded by the "
             "autoencoder, vs the rest, the best a stage 2 on it can expect). Compare rows only within one sweep.", ""]  # fmt: skip
    for i, sweep in enumerate(sweeps, 1):
        lines += [f"### Sweep {i}, {sweep['title']}: {machine_line(sweep['machine'])}, {sweep['minutes']:g} minutes each", "",
                  f"`.venv/bin/python benchmarks/stage2_recipes.py --minutes {sweep['minutes']:g} --only ...` then "
                  f"`--save --title {sweep['title']}`", "",
                  table(sweep["rows"]), ""]  # fmt: skip
        if sweep.get("finding"):
            lines += [sweep["finding"], ""]
    return lines


def posthoc_ema_section() -> list[str]:
    """The sweeps of ``benchmarks/posthoc_ema.py --save`` (a stage-2 run and its sweep: not part of make bench)."""
    from posthoc_ema import load, sweep_table

    records = load()
    if not records:
        return []
    lines = ["## Post-hoc EMA on the default stage-2 run (issue 28)", "",
             "A stage-2 run with `train.ema.kind=posthoc` (EDM2's profiles 0.05 and 0.10), its snapshots' reconstruction at "
             "each length scored by `python -m training.posthoc_ema --sweep` with the run's own evaluation (100 training "
             "captions, 25 DPM++ steps, the config's guidance, seed 0) beside the run's trained weights.", ""]  # fmt: skip
    for r in records:
        t = r["tracking"]
        cost = (f" Tracking both profiles took {t['step_ms']:.0f} ms a step ({t['parameters'] / 1e6:.1f}M parameters, "
                f"{t['threads']} threads) against the run's median training step of {t['train_step_ms']:.0f} ms, and a "
                f"snapshot of both {t['snapshot_s']:.1f} s (timed alone by the script).")  # fmt: skip
        lines += [f"### {r['variant']}: {machine_line(r['machine'])}", "",
                  f"`.venv/bin/python benchmarks/posthoc_ema.py --variant \"{r['variant']}\" ...` (`{r['command']}`): "
                  f"{r['snapshots']} snapshots, {r['snapshot_mib']:,} MiB.{cost} Guidance {r['guidance']}, {r['steps']} steps, "
                  f"{r['prompts']} captions; the best by {r['pick']} is exported.", "", sweep_table(r), ""]  # fmt: skip
        if r.get("finding"):
            lines += [r["finding"], ""]
    return lines


def large_dataset_section(path: Path) -> list[str]:
    """The rows of ``benchmarks/large_dataset.py --save`` (minutes of encoding: not part of make bench)."""
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    m = record["machine"]
    columns = [("images", "images"), ("processes", "processes"), ("peak_rss_mib", "peak RSS, largest process (MiB)"),
               ("encode_s", "encode (s)"), ("encode_images_per_s", "encode images/s"),
               ("launch_to_first_step_s", "launch to first step (s)")]  # fmt: skip
    # older files hold the synthetic imagefolder case without its command and setup
    command = record.get("command", "benchmarks/large_dataset.py --images 5000 100000 --processes 1 2 --save")
    what = record.get("setup", "Stage 2 (`configs/ldm/tiny.yaml`, tiny autoencoder, frozen MiniLM captions cached) on "
                                "synthetic 32x32 imagefolders, 30 steps")  # fmt: skip
    return [f"## Large datasets: memory, encode, time to the first step ({record.get('source', 'imagefolder')}; issues 14, 25)", "",
            f"{m['CPU']} ({m['cores']} cores), {m['date']}. {what}: `.venv/bin/python {command}`", "",
            "| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(f"{row[key]:,}" if isinstance(row[key], int) else str(row[key]) for key, _ in columns) + " |"
              for row in record["rows"]], ""]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--render", action="store_true", help="only re-render RESULTS.md from RESULTS.json (after editing NOTES.md)")
    args = p.parse_args()
    record_file = args.out.with_suffix(".json")
    if args.render:
        args.out.write_text(render(json.loads(record_file.read_text())))
        return
    start, record = time.perf_counter(), {"machine": machine(), "benchmarks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for script, extra, title in BENCHMARKS:
            print(f"== {title}", flush=True)
            extra = [a.format(tmp=tmp) for a in extra]
            results, text, seconds = run(script, extra, Path(tmp) / f"{script}.json")
            print(text, flush=True)
            command = " ".join([".venv/bin/python", f"benchmarks/{script}", *(a.replace(tmp, "TMP") for a in extra)])
            record["benchmarks"][script] = {"title": title, "command": command, "minutes": seconds / 60, "text": text, "results": results}
    record["minutes"] = (time.perf_counter() - start) / 60
    record_file.write_text(json.dumps(record, indent=2))
    args.out.write_text(render(record))
    print(f"wrote {args.out} ({record['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
