"""What a stage-2 run leaves: the pipeline folder (diffusers layout), LoRA adapters in diffusers'
format, and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from ldm.folders import write_sampling
from ldm.schedulers import folder_scheduler
from runtime.files import write_json_atomic
from training.config import to_dict
from training.ldm_config import LdmJobConfig
from training.run.guard import check_finite
from training.stage2.finetune import export_lora, export_lora_kohya, fused_lora_pipeline
from training.stage2.models import Models
from training.stage2.samples import pipeline_of


def export_run(
    cfg: LdmJobConfig,
    models: Models,
    out: Path,
    steps: int,
    cached_images: int,
    seconds: float,
    log: Path | None = None,
    extra: dict | None = None,
) -> Path:
    """``out/pipeline`` (and ``out/lora`` for a LoRA run) and ``out/metrics.json`` (the final loss from ``log``, by
    default ``out/log.jsonl``; ``extra`` added), with the held-out evaluation when ``eval.num_prompts`` asks for it.
    Refused if a trained weight is not finite.
    The folder's ``sampling.json`` is the run's ``sample:`` steps, guidance and sampler (those of its sample
    grids): what ``ldm.generate`` and the web page use when no flag says otherwise."""
    unet, vae = models.unet, models.vae
    trained_text_encoder = models.text_encoder if models.text_trains else None
    check_finite(unet, "U-Net")
    if trained_text_encoder is not None:
        check_finite(trained_text_encoder, "text encoder")
    if cfg.finetune.method == "lora":
        export_lora(unet, trained_text_encoder, out / "lora", xl=models.xl)  # SDXL: each text encoder's under its prefix
        if not models.xl:  # for A1111 / ComfyUI / sd-scripts; their SDXL files name the U-Net's original blocks: not written
            export_lora_kohya(unet, trained_text_encoder, out / "lora", cfg.finetune.lora_alpha)
        pipe = fused_lora_pipeline(
            models.source, out / "lora", vae if cfg.model.replace_vae else None, models.noise_scheduler.config
        )
    else:
        pipe = pipeline_of(vae, models.text_encoder, models.tokenizer, unet, folder_scheduler(models.noise_scheduler.config))
    pipe.save_pretrained(out / "pipeline")
    write_sampling(out / "pipeline", cfg.sample.steps, cfg.sample.guidance, cfg.sample.scheduler)
    metrics = {
        "steps": steps,
        "train_seconds_this_run": round(seconds, 1),
        "cached_images": cached_images,
        "mixed_precision": cfg.train.mixed_precision.accelerate_name(str(unet.device)),
        "precision_reason": cfg.train.mixed_precision.reason(str(unet.device)),
        "final_loss": last_logged(log or out / "log.jsonl", "loss"),
        **(extra or {}),
    }
    if cfg.eval.num_prompts:
        from training.eval.pipeline import evaluate_pipeline

        metrics["eval"] = evaluate_pipeline(
            out / "pipeline",
            cfg.data.path,
            cfg.eval.num_prompts,
            cfg.eval.steps,
            cfg.eval.guidance,
            seed=cfg.seed,
            data_cfg=cfg.data,
        )
    metrics["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"saved {out / 'pipeline'}; metrics in {out / 'metrics.json'}")
    return out / "pipeline"


def last_logged(path: Path, key: str):
    value = None
    for line in path.read_text().splitlines():
        value = json.loads(line).get(key, value)
    return value
