"""A distilled few-step student beside its teacher (issue 27): prompt top-1 and FD-VGG, and the README grid.

    .venv/bin/python benchmarks/distill_quality.py --teacher runs/ldm-openmoji-32/pipeline \
        --student runs/distill-openmoji-32/pipeline [--name NAME] [--save] [--grid docs/distill-openmoji-32.png]

Scores, by ``training.eval.pipeline`` on 100 training captions and on the same captions reworded (``unseen``):
the teacher at 25 DPM++ steps (its default) and at 4, and the student at 1, 2, 4 and 8 LCM steps, the teacher at
guidance 3 and the student at its own (its sampling.json). Prints a table; ``--save`` adds the run, with the
machine, the student's distillation figures (steps, seconds, config) and this command, to
``benchmarks/DISTILL.json`` under ``--name``. ``--grid``: a row per prompt with the teacher at 25 steps, then the
student at 1, 2 and 4 steps, 3 images each, the same seeds for all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SAVED = ROOT / "benchmarks" / "DISTILL.json"
DATA = ROOT / "data" / "openmoji-32"
TEACHER_GUIDANCE = 3.0  # the default config's evaluation guidance
ROWS = [("teacher", "dpm++", 25), ("teacher", "dpm++", 4), ("student", "lcm", 1), ("student", "lcm", 2),
        ("student", "lcm", 4), ("student", "lcm", 8)]  # fmt: skip
GRID_PROMPTS = ["red apple", "grinning face", "sun", "red heart", "pine tree", "rocket"]


def score(folders: dict, student_guidance: float, seed: int = 0) -> list[dict]:
    from training.eval.pipeline import evaluate_pipeline

    rows = []
    for who, sampler, steps in ROWS:
        guidance = TEACHER_GUIDANCE if who == "teacher" else student_guidance
        row = {"model": who, "sampler": sampler, "steps": steps, "guidance": guidance}
        for captions in ("train", "unseen"):
            m = evaluate_pipeline(folders[who], DATA, 100, steps, guidance, seed, captions_style=captions, sampler=sampler)
            row[captions] = {"top1": m["prompt_top1"], "fd_vgg": round(m["fd_vgg"], 1), "floor": round(m["fd_vgg_floor_real_sample"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | sampler | steps | guidance | train captions: top-1 / FD-VGG (floor) | unseen captions: top-1 / FD-VGG |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        t, u = r["train"], r["unseen"]
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {t['top1']:.2f} / {t['fd_vgg']:.0f} "
                     f"({t['floor']:.0f}) | {u['top1']:.2f} / {u['fd_vgg']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def save_grid(folders: dict, student_guidance: float, path: Path, per_prompt: int = 3) -> None:
    from ldm.pipeline import LatentDiffusionPipeline
    from runtime.images import save_grid as write_grid

    cells = []
    for who, sampler, steps, guidance in [("teacher", "dpm++", 25, TEACHER_GUIDANCE)] + [
        ("student", "lcm", k, student_guidance) for k in (1, 2, 4)
    ]:
        pipe = LatentDiffusionPipeline.from_pretrained(folders[who])
        pipe.set_scheduler(sampler)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(i) for i in range(len(GRID_PROMPTS) * per_prompt)]
        images = pipe(GRID_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=per_prompt,
                      generator=generators, output_type="pt").images  # fmt: skip
        cells.append(images.float() * 2 - 1)  # (P*n, 3, H, W)
    rows = [torch.cat([c[i * per_prompt : (i + 1) * per_prompt] for c in cells]) for i in range(len(GRID_PROMPTS))]
    write_grid(rows, path, scale=2)
    print(f"wrote {path}: a row per prompt of {GRID_PROMPTS}; teacher 25 steps, student 1, 2, 4 steps, {per_prompt} each")


def main() -> None:
    import runtime
    from ldm.folders import sampling_defaults

    runtime.configure()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=ROOT / "runs" / "ldm-openmoji-32" / "pipeline")
    p.add_argument("--student", type=Path, default=ROOT / "runs" / "distill-openmoji-32" / "pipeline")
    p.add_argument("--name", default="default", help="the run's name in benchmarks/DISTILL.json (--save)")
    p.add_argument("--save", action="store_true")
    p.add_argument("--grid", type=Path, default=None)
    p.add_argument("--no-score", action="store_true", help="only the grid")
    args = p.parse_args()
    folders = {"teacher": args.teacher, "student": args.student}
    student_guidance = sampling_defaults(args.student).get("guidance", TEACHER_GUIDANCE)
    if args.grid:
        save_grid(folders, student_guidance, args.grid)
    if args.no_score:
        return
    rows = score(folders, student_guidance)
    print(table(rows))
    if args.save:
        from report import machine

        metrics_file = args.student.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        run = {"name": args.name, "machine": machine(), "command": " ".join(sys.argv), "teacher": str(args.teacher),
               "student": str(args.student), "distill_steps": metrics.get("steps"),
               "distill_seconds": metrics.get("train_seconds_this_run"), "distill_config": metrics.get("config"), "rows": rows}  # fmt: skip
        saved = json.loads(SAVED.read_text())["runs"] if SAVED.is_file() else []
        SAVED.write_text(json.dumps({"runs": [r for r in saved if r["name"] != args.name] + [run]}, indent=2))


if __name__ == "__main__":
    main()
