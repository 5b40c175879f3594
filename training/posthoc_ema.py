"""Choose a stage-2 run's EMA after training (post-hoc EMA, EDM2): reconstruct the EMA of any length from the
snapshots a run with ``train.ema.kind=posthoc`` kept, and export it as a pipeline.

    python -m training.posthoc_ema --run runs/ldm-openmoji-32 --sigma-rel 0.08 --out runs/ldm-ema-0.08
    python -m training.posthoc_ema --run runs/ldm-openmoji-32 --sweep --out runs/ldm-ema-best [--pick fd_vgg|top1]

``--sigma-rel``: the EMA's length as a fraction of the run's age (EDM2's sigma_rel: 0.05 averages about the last 5% of
the steps' weights, more of the recent ones); ``--step`` another snapshot's step than the last. ``OUT/pipeline`` is the
run's export with those weights (for LoRA runs ``OUT/lora`` too), ``OUT/metrics.json`` its figures (the run's
``eval:`` settings) and the reconstruction's. ``--sweep`` scores each length of ``--sigma-rels`` the snapshots
reconstruct, and the trained weights beside them, with the run's own evaluation (prompt top-1 and FD-VGG on
``eval.num_prompts`` captions, 100 when that is 0, at ``eval.steps`` and ``eval.guidance``); writes the table to
``OUT/posthoc-sweep.json`` and prints it, then exports the best by ``--pick`` into ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

import runtime
from runtime.errors import one_line_errors
from runtime.files import write_json_atomic
from training.config import ConfigError, RunError, load_config
from training.ldm_config import LdmJobConfig
from training.run.posthoc_ema import find_snapshots, reconstruct, reconstructable
from training.stage2.export import export_run
from training.stage2.models import load_models, prepare_to_train, resolve_objective

SWEEP = [0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.10, 0.13, 0.16, 0.20, 0.25]


def export_posthoc(run_dir: Path, sigma_rel: float, out: Path, step: int | None = None, evaluate: bool = True) -> dict:
    """``out/pipeline`` with the EMA of length ``sigma_rel`` at ``step`` (the last snapshot's by default) in place of
    the run's trained weights; returns the reconstruction's figures (and the evaluation's under ``eval``)."""
    cfg = run_config(run_dir)
    weights, done = reconstruct(find_snapshots(run_dir), sigma_rel, step)  # a length it cannot fit: said before loading
    models = load_models(cfg)
    prepare_to_train(models, cfg.finetune, "cpu")  # LoRA: the adapters the snapshots hold
    trained = {name: p for name, p in models.unet.named_parameters() if p.requires_grad}
    if set(trained) != set(weights):
        raise RunError(
            f"the snapshots of {run_dir} are not of this run's U-Net: {len(weights)} tensors for {len(trained)} parameters"
        )
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(weights[name])
    ran = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    export_cfg = cfg if evaluate else replace(cfg, eval=replace(cfg.eval, num_prompts=0))
    export_run(export_cfg, models, out, done["step"], ran.get("cached_images", 0), ran.get("train_seconds_this_run", 0.0),
               log=run_dir / "log.jsonl", extra={"posthoc_ema": {**done, "run": str(run_dir)}})  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    return {**done, **({"eval": metrics["eval"]} if "eval" in metrics else {})}


def run_config(run_dir: Path) -> LdmJobConfig:
    """The stage-2 config a run saved (its objective as it trained: :func:`resolve_objective`); anything else is named in
    one line."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a training run folder: it has no config.yaml")
    try:
        return resolve_objective(load_config(LdmJobConfig, path))
    except ConfigError as err:
        raise RunError(f"{run_dir} is not a stage-2 run (training.train_ldm): {err}") from None


def sweep(run_dir: Path, out: Path, candidates: list[float], pick: str) -> list[dict]:
    """Score each reconstructable length of ``candidates`` and the trained weights; export the best into ``out``."""
    from training.eval.pipeline import evaluate_pipeline

    cfg = run_config(run_dir)
    snapshots = find_snapshots(run_dir)
    lengths = reconstructable(snapshots, candidates)
    if not lengths:
        raise ConfigError(f"none of --sigma-rels {candidates} can be reconstructed from this run's snapshots")
    n = cfg.eval.num_prompts or 100

    def score(pipeline: Path) -> dict:
        m = evaluate_pipeline(pipeline, cfg.data.path, n, cfg.eval.steps, cfg.eval.guidance, seed=cfg.seed, data_cfg=cfg.data)
        return {
            "top1": m["prompt_top1"],
            "fd_vgg": round(m["fd_vgg"], 1),
            "fd_vgg_floor": round(m["fd_vgg_floor_real_sample"], 1),
        }

    rows = [{"weights": "trained (no EMA)", "sigma_rel": None, **score(run_dir / "pipeline")}]
    scratch = out / ".sweep"
    for sigma_rel in lengths:
        export_posthoc(run_dir, sigma_rel, scratch, evaluate=False)
        rows.append({"weights": f"post-hoc EMA {sigma_rel}", "sigma_rel": sigma_rel, **score(scratch / "pipeline")})
        print(json.dumps(rows[-1]))
    shutil.rmtree(scratch, ignore_errors=True)
    best = min(rows, key=lambda r: -r["top1"] if pick == "top1" else r["fd_vgg"])
    table = {"run": str(run_dir), "prompts": n, "steps": cfg.eval.steps, "guidance": cfg.eval.guidance, "pick": pick,
             "best": best["weights"], "rows": rows}  # fmt: skip
    if best["sigma_rel"] is not None:
        export_posthoc(run_dir, best["sigma_rel"], out, evaluate=False)
    else:  # the trained weights won: the run's own export, as it is
        shutil.copytree(run_dir / "pipeline", out / "pipeline", dirs_exist_ok=True)
    write_json_atomic(out / "posthoc-sweep.json", table)
    print(sweep_table(table))
    return rows


def sweep_table(table: dict) -> str:
    """A ``posthoc-sweep.json`` table as Markdown, the exported row marked."""
    lines = ["| weights | top-1 | FD-VGG (floor) |", "|---|---|---|"]
    for r in table["rows"]:
        mark = " (exported)" if r["weights"] == table["best"] else ""
        lines.append(f"| {r['weights']}{mark} | {r['top1']:.2f} | {r['fd_vgg']:.0f} ({r['fd_vgg_floor']:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a stage-2 run folder trained with train.ema.kind=posthoc")
    parser.add_argument("--out", required=True, type=Path, help="where OUT/pipeline and OUT/metrics.json go")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=float, help="the EMA's length (EDM2's sigma_rel, e.g. 0.05-0.15)")
    what.add_argument("--sweep", action="store_true", help="score a range of lengths and export the best")
    parser.add_argument("--step", type=int, default=None, help="a snapshot's step (default: the last)")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=SWEEP, help="--sweep's lengths")
    parser.add_argument("--pick", choices=["fd_vgg", "top1"], default="fd_vgg", help="--sweep's criterion")
    args = parser.parse_args(argv)
    with one_line_errors():
        runtime.configure()
        if args.out.resolve() == args.run.resolve():
            raise ConfigError(f"--out {args.out} is the run itself: name another folder (its pipeline/ stays as trained)")
        if args.sweep:
            sweep(args.run, args.out, args.sigma_rels, args.pick)
        else:
            print(json.dumps(export_posthoc(args.run, args.sigma_rel, args.out, args.step)))


if __name__ == "__main__":
    main()
