"""README.md is a contract: the figures it gives for `make demo` are those of the committed summary of a
fresh clone's run (docs/demo-summary.json, a copy of the runs/demo-summary.json that `make demo` writes), and
those it gives for the default configs run to their full length are those of docs/full-configs-summary.json
(`make demo` of the same day before its time budgets)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
README_TEXT = " ".join(README.split())  # lines unwrapped: a command or a sentence may be wrapped over lines there
SUMMARIES = {name: json.loads((ROOT / "docs" / name).read_text()) for name in ("demo-summary.json", "full-configs-summary.json")}


def assert_said(said: list[str], source: str) -> None:
    """Every string of ``said`` (figures of the committed file ``source``) is in the README, lines unwrapped."""
    missing = [s for s in said if s not in README_TEXT]
    assert not missing, f"README.md lacks these figures of {source}: {missing}"


def minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


@pytest.mark.parametrize("name", SUMMARIES)
def test_the_readmes_demo_figures_are_the_committed_summarys(name):
    summary = SUMMARIES[name]
    ae, ldm = summary["autoencoder"], summary["ldm"]
    held_out = ae["test"]
    said = [
        minutes(summary["make_demo_seconds"]),  # the whole command, install included
        minutes(ae["wall_seconds"]),
        minutes(ldm["wall_seconds"]),
        f"{held_out['psnr']:.1f} dB",
        f"LPIPS {held_out['lpips']:.3f}",
        f"colour error {held_out['colour_error']:.1f}",
        *(f"{ae['ood'][name]['psnr']:.1f} dB" for name in ("photos", "glyphs")),
        *(f"{v:.1f} @{k}" for k, v in ae["val_psnr"].items()),
        f"top-1 {ldm['prompt_top1']:.2f}",
        f"FD-VGG {ldm['fd_vgg']:.0f}",
        f"{ldm['fd_vgg_floor_real_sample']:.0f}",
        f"{ldm['fd_vgg_real_halves']:.0f}",
        *(f"{v:.3f} @{k}" for k, v in ldm["loss"].items()),
        summary["machine"]["CPU"],
    ]
    missing = [s for s in said if s not in README]
    assert not missing, f"README.md lacks these figures of docs/{name}: {missing}"


def test_the_readmes_stage2_recipe_figures_are_the_committed_sweeps():
    sweeps = {s["title"]: {r["name"]: r for r in s["rows"]} for s in json.loads((ROOT / "benchmarks" / "STAGE2_RECIPES.json").read_text())["sweeps"]}
    rows = sweeps["U-Net shape"]
    cell = lambda name, key="train_25": f"{rows[name][key]['top1']:.2f} / {rows[name][key]['fd_vgg']:.0f}"  # noqa: E731
    default, base = "default, U-Net attention at 4x4 and 2x2, 1 layer per block, 2660 steps", "the default config (WSD, no EMA), 1600 steps"
    g15 = f"{default}; eval: guidance 1.5"
    seeds = [rows[n]["train_25"] for n in (g15, f"{g15}, seed 1", f"{g15}, seed 2")]
    dropout = sweeps["caption dropout"]  # the default config now: the U-Net shape's winner with 5% caption dropout
    g15_now = "default (coarse-attn), caption dropout 0.05; eval: guidance 1.5"
    now_seeds = [dropout[n]["train_25"] for n in (g15_now, f"{g15_now}, seed 1", f"{g15_now}, seed 2")]
    now = lambda key, name=g15_now: f"{dropout[name][key]['top1']:.2f} / {dropout[name][key]['fd_vgg']:.0f}"  # noqa: E731
    said = [f"| **{now('train_25')}** | {cell(g15)} | {cell(f'{base}; eval: guidance 1.5')} |",
            f"| **{now('train_8')}** | {cell(g15, 'train_8')} | {cell(f'{base}; eval: guidance 1.5', 'train_8')} |",
            f"| {now('unseen_25')} | {cell(g15, 'unseen_25')} | {cell(f'{base}; eval: guidance 1.5', 'unseen_25')} |",
            f"| {now('train_25', 'default (coarse-attn), caption dropout 0.05')} | {cell(default)} | {cell(base)} |",
            f"| {dropout['default (coarse-attn), caption dropout 0.05']['final_loss']:.3f} @2660 (velocity) | {rows[default]['final_loss']:.3f} @2660 |",
            f"| {rows[default]['train_seconds']:.0f} s of training | {rows[base]['train_seconds']:.0f} s of training |",
            f"{rows[default]['final_loss']:.3f} @{rows[default]['steps']}", f"{rows[base]['final_loss']:.3f} @{rows[base]['steps']}",
            "top-1 {:.2f}, {:.2f} and {:.2f} and FD-VGG {:.0f}, {:.0f} and {:.0f} at 25 steps (mean {:.0f};".format(
                *(s["top1"] for s in seeds), *(s["fd_vgg"] for s in seeds), sum(s["fd_vgg"] for s in seeds) / 3),
            "top-1 {:.2f}, {:.2f} and {:.2f} and FD-VGG {:.0f}, {:.0f} and {:.0f} at 25 steps (mean {:.0f});".format(
                *(s["top1"] for s in now_seeds), *(s["fd_vgg"] for s in now_seeds), sum(s["fd_vgg"] for s in now_seeds) / 3),
            f"3,216 steps ({rows['default, U-Net attention at 4x4 and 2x2, 1 layer per block']['train_seconds']:,.0f} s",
            f"scored {cell('default, U-Net attention at 4x4 and 2x2, 1 layer per block')} at guidance 3"]  # fmt: skip
    wsd = sweeps["full length, WSD"]
    pair = lambda name, key="train_25": f"{wsd[name][key]['top1']:.2f} / {wsd[name][key]['fd_vgg']:.0f}"  # noqa: E731
    said += [f"constant LR with EMA 0.995 scored {pair('the default config, 1600 steps')}",
             f"EMA 0.995 {pair('default, WSD (1-sqrt decay over the last 20%)')}", f"decay, {pair('default, WSD, no EMA')} (8 steps",
             f"a 30% decay {pair('default, WSD over the last 30%, no EMA')} (8 steps {pair('default, WSD over the last 30%, no EMA', 'train_8')})"]  # fmt: skip
    assert_said(said, "benchmarks/STAGE2_RECIPES.json")
    twice = next(s for s in json.loads((ROOT / "benchmarks" / "STAGE2_RECIPES.json").read_text())["sweeps"]
                 if s["title"] == "diagnostic: twice the steps")["rows"][0]  # fmt: skip
    pair = lambda key: f"{twice[key]['top1']:.2f} / {twice[key]['fd_vgg']:.0f}"  # noqa: E731
    assert_said([f"{pair('train_25')} at 25 steps (autoencoder floor {twice['train_25']['autoencoder_floor']:.0f}",
                 f"{pair('unseen_25')} on unseen captions"], "benchmarks/STAGE2_RECIPES.json")  # fmt: skip


def test_the_readmes_avx2_demo_figures_are_the_committed_measurement():
    proxy = json.loads((ROOT / "docs" / "demo-summary-avx2.json").read_text())
    budgets = 60 * (proxy["autoencoder"]["budget"]["max_minutes"] + proxy["ldm"]["budget"]["max_minutes"])
    assert proxy["ldm"]["mixed_precision"] == "no"  # fp32, as on a CPU without bf16 units
    said = [minutes(proxy["make_demo_seconds"]), f"{minutes(proxy['make_demo_seconds'] - budgets)} of it outside", proxy["command"].split(" make")[0]]
    assert_said(said, "docs/demo-summary-avx2.json")


def test_the_readmes_parquet_memory_figures_are_the_committed_measurements():
    record = json.loads((ROOT / "benchmarks" / "LARGE_DATASET-parquet.json").read_text())
    small = [row["peak_rss_mib"] for row in record["rows"] if row["images"] == 2000]
    (large,) = [row["peak_rss_mib"] for row in record["rows"] if row["images"] == 40000]
    growth = sorted(round(100 * (large / s - 1)) for s in small)
    said = [
        f"{round(min(small))} and {round(max(small))} MiB at 2,000 images",
        f"{round(large)} MiB at 40,000",
        f"+{growth[0]}% to +{growth[-1]}%",
        record["command"].removeprefix("benchmarks/large_dataset.py "),
    ]
    assert_said(said, "benchmarks/LARGE_DATASET-parquet.json")
    assert max(growth) <= 10  # the promise: within +10% at 20x the images
    wds = {row["images"]: row["peak_rss_mib"] for row in json.loads((ROOT / "benchmarks" / "LARGE_DATASET-webdataset.json").read_text())["rows"]}
    said = f"from {round(wds[2000])} MiB at 2,000 to {round(wds[10000])} MiB at 10,000 (+{round(100 * (wds[10000] / wds[2000] - 1))}%;"
    assert said in README_TEXT, said


def test_the_readmes_distillation_figures_are_the_committed_measurements():
    run = json.loads((ROOT / "benchmarks" / "DISTILL.json").read_text())["runs"][0]
    speed = json.loads((ROOT / "benchmarks" / "DISTILL_SPEED.json").read_text())["results"]
    said = [f"**{run['distill_seconds']:.0f} s of training**", f"({run['distill_seconds'] / run['distill_steps']:.2f} s a step)",
            minutes(run["timeline_seconds"]["first_cache_write_to_metrics"]), f"{run['avx2_fp32_proxy']['seconds_per_step']:.2f} s",
            f"{speed['diffusers_fp32']:.2f} s", f"{speed['ours_default']:.2f} s ({speed['ours_default_speedup']:.2f}x)",
            f"**{speed['student_4_steps']:.2f} s: {speed['student_4_steps_speedup']:.1f}x**"]  # fmt: skip
    for row in run["rows"]:
        t, u = row["train"], row["unseen"]
        cell = f"{t['top1']:.2f} / {t['fd_vgg']:.0f}"
        label = {"dpm++": "DPM++", "lcm": "LCM"}[row["sampler"]]
        said.append(f"| {row['model']} | {label}, {row['steps']} | {row['guidance']:g} | "
                    + (f"**{cell}**" if row["model"] == "student" and row["steps"] == 4 else cell) + f" | {u['top1']:.2f} / {u['fd_vgg']:.0f} |")  # fmt: skip
    lora = json.loads((ROOT / "benchmarks" / "DISTILL.json").read_text())["runs"][1]
    said.append(f"reaches {lora['eval']['prompt_top1']:.2f} / {lora['eval']['fd_vgg']:.0f} at 4 steps after its 400 steps ({lora['distill_seconds']:.0f} s)")
    assert_said(said, "benchmarks/DISTILL.json and benchmarks/DISTILL_SPEED.json")
