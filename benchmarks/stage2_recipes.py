"""Stage-2 recipes at equal wall-clock time: objectives, then the levers on the winner (issue 26).

    .venv/bin/python benchmarks/stage2_recipes.py [--minutes 6] [--only NAME ...] [--table] [--save [--title T]]
    .venv/bin/python benchmarks/stage2_recipes.py --eval-of NAME [--only LEVER ...]   # the evaluation's levers on a trained variant

Each variant is ``configs/ldm/openmoji-32.yaml`` plus overrides, trained for ``--minutes`` of its
own loop (``train.max_minutes``: the job measures its step time and fixes its step count; the
step cap is lifted), on the default autoencoder (``runs/autoencoder-openmoji-32-f4/vae``, from
``make demo``'s first stage) with one latent cache for all. Every run is scored by
``training.eval.pipeline`` on 100 training captions and on the same captions reworded in sentences no
caption has (``--captions unseen``), each at 25 and at 8 DPM++ steps (guidance 3): prompt top-1 among
20 candidates (chance 0.05) and FD-VGG with its floors (100 real images vs the rest; the same images
through the autoencoder vs the rest). Rows go to
``runs/recipes/results.jsonl`` as each run ends (a variant run again replaces its row); ``--save``
writes them with the machine to ``benchmarks/STAGE2_RECIPES.json`` as one sweep, which
``benchmarks/report.py`` renders. About ``--minutes`` + 2 minutes per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ldm" / "openmoji-32.yaml"
VAE = ROOT / "runs" / "autoencoder-openmoji-32-f4" / "vae"
OUT = ROOT / "runs" / "recipes"
SAVED = ROOT / "benchmarks" / "STAGE2_RECIPES.json"
# The sweeps ran on the config as it was, DDPM eps + min-SNR 5 at LR 5e-4 with a constant LR and EMA 0.995; their
# winners are the config now, so each variant names every key it changes from the config of today: the same runs.
BASE = ["model.unet=base"]  # the U-Net of every sweep before the shape rows
CONSTANT = [*BASE, "train.lr_schedule=constant_with_warmup", "train.ema_decay=0.995"]  # the config before the WSD rows
DDPM = [*CONSTANT, "objective.type=ddpm", "objective.min_snr_gamma=5.0", "train.lr=5e-4"]
FLOW = [*CONSTANT, "objective.type=flow", "train.lr=5e-4"]
FLOW_LN = [*FLOW, "objective.timesteps=logit_normal"]
# name: (overrides on the config, what we expected it to do)
# fmt: off
VARIANTS: dict[str, tuple[list[str], str]] = {
    "ddpm eps, min-SNR 5 (the old default)": (DDPM, "the reference"),
    "ddpm v, zero terminal SNR": ([*DDPM, "model.prediction_type=v_prediction", "objective.zero_terminal_snr=true"],
                                  "about the same; better colour at high guidance"),
    "flow, uniform sigma": ([*FLOW, "objective.timesteps=uniform"], "close to ddpm eps"),
    "flow, logit-normal sigma": ([*FLOW, "objective.timesteps=logit_normal"], "better than uniform (SD3's finding)"),
    "flow, logit-normal, shift 3": ([*FLOW, "objective.timesteps=logit_normal", "objective.shift=3.0"],
                                    "worse at 8x8 latents: shift is for many pixels"),
    # the levers, on the objective screen's winner (flow, logit-normal: the lowest FD-VGG of the flows)
    "flow-ln, batch 128": ([*FLOW_LN, "train.batch_size=128"], "better: 8x8 steps are overhead-bound, so more images a minute"),
    "flow-ln, batch 256, LR 1e-3": ([*FLOW_LN, "train.batch_size=256", "train.lr=1e-3"],
                                    "better still if the LR keeps up with the batch"),
    "flow-ln, LR 1e-3": ([*FLOW_LN, "train.lr=1e-3"], "a little better early, unstable later"),  # the config now
    "flow-ln, cosine to 0 over the budget": ([*FLOW_LN, "train.lr_schedule=cosine"],
                                             "better: the budget fixes the horizon, so the LR can anneal"),
    "flow-ln, U-Net small (35M)": ([*FLOW_LN, "model.unet=small"], "worse in 6 min: fewer steps; may win in longer runs"),
    # the default config's own 1,600 steps (objective-independent step cost: the old default's wall-clock), then the
    # levers at that wall-clock (--minutes: that run's training minutes on the machine)
    "the default config, 1600 steps": ([*CONSTANT, "train.max_steps=1600"], "the reference: 0.81 / 1590 at 1,355 steps on the AMD VM"),
    "default, batch 32": ([*CONSTANT, "train.batch_size=32"], "better: batch 128 and 256 lost to 64, so the loop is below its critical batch"),
    "default, LR 2e-3": ([*CONSTANT, "train.lr=2e-3"], "a little better, or unstable"),
    "default, logit-normal mean -0.5": ([*CONSTANT, "objective.logit_mean=-0.5"],
                                        "lower FD-VGG, lower top-1: more training near the data (shift 3, the other way, did the opposite)"),
    # the LR's end: warm-up, constant, then 1-sqrt to 0 over the last 20% (cosine over the whole run lost: half the mean LR)
    "default, WSD (1-sqrt decay over the last 20%)": ([*BASE, "train.max_steps=1600", "train.lr_schedule=warmup_stable_decay", "train.ema_decay=0.995"],
                                                      "better on both: the decayed end fits what the constant LR leaves noisy"),
    # its raw weights at step 1,600 scored better than its EMA (0.86 / 1399 vs 0.85 / 1459 at 25 steps): the EMA's
    # 200-step memory reaches back into the weights before the decay. "WSD, no EMA" is the config now
    "default, WSD, no EMA": ([*BASE, "train.max_steps=1600", "train.lr_schedule=warmup_stable_decay", "train.ema_decay=null"],
                             "better than WSD with EMA 0.995: the decay averages the weights already"),
    "default, WSD over the last 30%, no EMA": ([*BASE, "train.max_steps=1600", "train.lr_schedule=warmup_stable_decay",
                                                "train.lr_decay_fraction=0.3", "train.ema_decay=null"],
                                               "about the same: a longer decay lowers the mean LR"),
    # a diagnostic, not a candidate: twice the default's steps (and wall-clock). Does compute alone draw the
    # grid's single-image captions ("sun", "rocket") as shapes, or do they stay fragments?
    "default, 3200 steps (twice the wall-clock)": ([*BASE, "train.max_steps=3200"], "better on both; sun and rocket take shape"),
    # the U-Net's shape at the default's wall-clock (--minutes: the reference row's training minutes on the machine).
    # A step of "base" spends most of its time at the 8x8 level (its cross-attention and two ResNets per block);
    # these move attention to the 4x4 and 2x2 levels (and the mid block), where a token costs 1/4 and 1/16 as much
    "the default config (WSD, no EMA), 1600 steps": ([*BASE, "train.max_steps=1600"], "the reference: 0.86 / 1399 in sweep 5 (another VM)"),
    "default, U-Net attention at 4x4 and 2x2, 1 layer per block": (["model.unet=coarse-attn"],
        "better on both: 2.3x the steps (261 vs 612 ms a step), 17M parameters against 18.5M"),
    # the row above overran its budget by 21% (its first 100 steps, which fix the step count, ran at 210 images/s, the
    # rest at ~188): the same at the steps 188 images/s fit in the reference's 906 s of training
    "default, U-Net attention at 4x4 and 2x2, 1 layer per block, 2660 steps": (["model.unet=coarse-attn", "train.max_steps=2660"],
        "better on top-1, about the same FD-VGG: the row above at 83% of its steps"),
    # caption dropout on the default (coarse-attn, 2,660 steps: the same steps, so the same compute): the share of steps
    # that train the unconditional prediction classifier-free guidance subtracts
    "default (coarse-attn), caption dropout 0.05": (["train.max_steps=2660", "objective.caption_dropout=0.05"],
        "about the same: 5% more conditional steps; a weaker unconditional model for guidance"),
    "default (coarse-attn), caption dropout 0.2": (["train.max_steps=2660", "objective.caption_dropout=0.2"],
        "about the same top-1, lower FD-VGG at low guidance: a better unconditional model"),
    # post-hoc EMA (issue 28): the default's run, tracking EDM2's two profiles (20 snapshots each); then the EMA in place of
    # the LR's decay. benchmarks/posthoc_ema.py sweeps the lengths on each
    "default (coarse-attn), post-hoc EMA snapshots": (["train.max_steps=2660", "train.ema.kind=posthoc", "train.ema.snapshot_every=133"],
        "the trained weights as the default's; an EMA of the right length a little better (EDM2)"),
    "default (coarse-attn), constant LR, post-hoc EMA snapshots": (["train.max_steps=2660", "train.lr_schedule=constant_with_warmup",
        "train.ema.kind=posthoc", "train.ema.snapshot_every=133"], "its best EMA about as good as the LR's decay"),
    # "sun" and "rocket" (issue 26): each names one training image; more optimizer steps over the same images seen, at the
    # default's wall-clock (--minutes 14.6: the default's 877 s of training)
    "default (coarse-attn, 5% caption dropout), batch 32": (["train.batch_size=32"],
        "better top-1 and the one-image captions (sun, rocket) drawn better: ~1.8x the updates for the same images seen"),
    "default (coarse-attn, 5% caption dropout), LR 2e-3": (["train.max_steps=2660", "train.lr=2e-3"],
        "the one-image captions (sun, rocket) fitted further at the same steps; a risk of divergence (base diverged at 2e-3 on the Xeon)"),
    "default (coarse-attn, 5% caption dropout), attention at 8x8 too": (["model.unet=all-attn"],
        "sun and rocket drawn (the caption reaches the finest level, as in base, which drew them at 57 epochs); fewer steps"),
    "default (coarse-attn, 5% caption dropout), 2 layers a block": (["model.unet=coarse-attn-2"],
        "sun and rocket drawn (base, with 2 layers a block, drew them at 57 epochs; all-attn showed the 8x8 attention alone does not); fewer steps, lower top-1"),
    "default (coarse-attn, 5% caption dropout), CLIP text encoder trained with it": (["model.text_encoder=clip-scratch", "model.clip_preset=small"],
        "sun and rocket drawn: an encoder trained on these captions keeps one-image words apart where frozen MiniLM may not; fewer steps (it runs forward and backward every step)"),
}
# fmt: on


def job(out: Path, overrides: list[str], minutes: float) -> list[str]:
    return [sys.executable, "-m", "training.train_ldm", "--config", str(CONFIG), f"model.vae={VAE}", f"output_dir={out}",
            f"cache.dir={OUT / 'latent-cache'}", f"train.max_minutes={minutes}", "train.max_steps=1000000",
            "train.sample_every=1000000", "train.checkpoint_every=1000000", "eval.num_prompts=0", "train.report_to=none", *overrides]  # fmt: skip


# the evaluation's levers, on one trained variant (--eval-of): name: (evaluate() arguments, what we expected)
EVAL_LEVERS: dict[str, tuple[dict, str]] = {
    "guidance 1.5": ({"guidance": 1.5}, "lower FD-VGG than guidance 2, top-1 falling faster"),
    "guidance 2": ({"guidance": 2.0}, "lower top-1, about the same FD-VGG"),
    "guidance 5": ({"guidance": 5.0}, "higher top-1, worse FD-VGG (less diverse)"),
    "UniPC": ({"sampler": "unipc"}, "the same as DPM++ at 25 steps, a little better at 8"),
    "Euler": ({"sampler": "euler"}, "the same as DPM++ at 25 steps, worse at 8 (first order)"),
    # the evaluation's own spread: other noise for the same 100 captions (and another draw of the real sample and candidates)
    "seed 1": ({"seed": 1}, "within ~0.04 top-1 and a few tens of FD-VGG of seed 0"),
    "seed 2": ({"seed": 2}, "within ~0.04 top-1 and a few tens of FD-VGG of seed 0"),
    "guidance 1.5, seed 1": ({"guidance": 1.5, "seed": 1}, "within ~0.04 top-1 and a few tens of FD-VGG of seed 0"),
    "guidance 1.5, seed 2": ({"guidance": 1.5, "seed": 2}, "within ~0.04 top-1 and a few tens of FD-VGG of seed 0"),
}


def evaluate(pipeline: Path, guidance: float = 3.0, sampler: str = "dpm++", seed: int = 0) -> dict:
    from training.eval.pipeline import evaluate_pipeline

    figures = {}
    for captions in ("train", "unseen"):
        for steps in (25, 8):
            m = evaluate_pipeline(pipeline, ROOT / "data" / "openmoji-32", 100, steps, guidance, seed, captions_style=captions, sampler=sampler)
            figures[f"{captions}_{steps}"] = {
                "top1": m["prompt_top1"], "fd_vgg": round(m["fd_vgg"], 1), "floor": round(m["fd_vgg_floor_real_sample"], 1),
                "autoencoder_floor": round(m["fd_vgg_floor_autoencoder"], 1),
            }  # fmt: skip
    return figures


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_variant(name: str, overrides: list[str], expected: str, minutes: float) -> dict:
    out = OUT / slug(name)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run(job(out, overrides, minutes), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fixed = next(r for r in log if r.get("event") == "budget")
    metrics = json.loads((out / "metrics.json").read_text())
    row = {"name": name, "overrides": overrides, "expected": expected, "steps": metrics["steps"],
           "train_seconds": metrics["train_seconds_this_run"], "seconds_per_step": fixed["seconds_per_step"],
           "final_loss": metrics["final_loss"], **evaluate(out / "pipeline")}  # fmt: skip
    return _append(row)


def eval_lever(variant: str, name: str, arguments: dict, expected: str) -> dict:
    """The trained ``variant`` scored with other evaluation settings (DPM++ at guidance 3 is its own row)."""
    trained = _rows()[variant]
    row = {**{k: trained[k] for k in ("overrides", "steps", "train_seconds", "seconds_per_step", "final_loss")},
           "name": f"{variant}; eval: {name}", "expected": expected, **evaluate(OUT / slug(variant) / "pipeline", **arguments)}  # fmt: skip
    return _append(row)


def _append(row: dict) -> dict:
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _rows() -> dict[str, dict]:
    rows = {}
    for line in (OUT / "results.jsonl").read_text().splitlines():  # a variant run again replaces its row
        row = json.loads(line)
        rows[row["name"]] = row
    return rows


def table(rows: list[dict]) -> str:
    cells = ("train_25", "train_8", "unseen_25", "unseen_8")
    lines = ["| variant | steps | train s | " + " | ".join(f"{c.replace('_', ' captions, ')} steps: top-1 / FD-VGG (floor)" for c in cells)
             + " | autoencoder floor | expected |", "|---|---|---|" + "---|" * len(cells) + "---|---|"]  # fmt: skip
    for r in rows:
        figs = " | ".join(f"{r[c]['top1']:.2f} / {r[c]['fd_vgg']:.0f} ({r[c]['floor']:.0f})" for c in cells)
        ae = r["train_25"].get("autoencoder_floor")  # the same images for every cell; rows before it was measured lack it
        lines.append(f"| {r['name']} | {r['steps']} | {r['train_seconds']:.0f} | {figs} | {'-' if ae is None else f'{ae:.0f}'} | {r['expected']} |")
    return "\n".join(lines)


def load_sweeps() -> list[dict]:
    return json.loads(SAVED.read_text())["sweeps"] if SAVED.is_file() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per variant (train.max_minutes)")
    p.add_argument("--only", nargs="*", default=None, help="variant names (with --eval-of: lever names; default: all)")
    p.add_argument("--title", default="objectives", help="the sweep's name in benchmarks/STAGE2_RECIPES.json (--save)")
    p.add_argument("--eval-of", default=None, help="a trained variant's name: score it with each of EVAL_LEVERS instead")
    p.add_argument("--table", action="store_true", help="print the table of runs/recipes/results.jsonl and stop")
    p.add_argument("--save", action="store_true", help="write runs/recipes/results.jsonl (the --only rows) to "
                   "benchmarks/STAGE2_RECIPES.json as this machine's sweep of today named --title, and stop")  # fmt: skip
    args = p.parse_args()
    if args.table or args.save:
        rows = _rows()
        if args.only is not None:
            rows = {k: v for k, v in rows.items() if k in args.only}
        if args.save:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from report import machine

            sweep = {"title": args.title, "machine": machine(), "minutes": args.minutes, "command": " ".join(sys.argv), "rows": list(rows.values())}
            key = lambda s: (s.get("title"), s["machine"]["date"], s["machine"]["CPU"])
            SAVED.write_text(json.dumps({"sweeps": [s for s in load_sweeps() if key(s) != key(sweep)] + [sweep]}, indent=2))
        print(table(list(rows.values())))
        return
    if not (VAE / "config.json").is_file():
        sys.exit(f"{VAE} is missing: run make demo's first stage (or the stage-1 command in the README) first")
    if args.eval_of is not None:
        for name, (arguments, expected) in EVAL_LEVERS.items():
            if args.only is None or name in args.only:
                print(json.dumps(eval_lever(args.eval_of, name, arguments, expected)), flush=True)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (overrides, expected) in VARIANTS.items():
        if args.only is None or name in args.only:
            print(json.dumps(run_variant(name, overrides, expected, args.minutes)), flush=True)


if __name__ == "__main__":
    main()
