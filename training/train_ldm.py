"""Stage 2: train a text-conditional U-Net to denoise the latents of a frozen stage-1 autoencoder.

    accelerate launch -m training.train_ldm --config configs/ldm/openmoji-32.yaml [key=value ...]

The dataset is encoded once into a latent cache (posterior moments, and the caption states of a
frozen text encoder); training steps never run the autoencoder. Running the same command again
on the same ``output_dir`` resumes exactly. At the end: ``output_dir/pipeline/`` (diffusers
layout; the U-Net is the EMA one) and ``output_dir/metrics.json``.

The schema is ``training/ldm_config.py``; models ``training/ldm_models.py``; the loss
``ldm/objective.py``; captions ``training/conditioning.py``; LoRA ``training/finetune.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from autoencoder import downsampling_factor, normalize_latents, sample_latents
from ldm.objective import DenoisingObjective
from ldm.pipeline import LatentDiffusionPipeline, check_pipeline_folder
from ldm.schedulers import make_scheduler
from ldm.text import uses_attention_mask
from ldm.unet import unet_downsampling
from training.checkpoint import save_checkpoint
from training.conditioning import Conditioning
from training.config import parse_cli, to_dict
from training.buckets import BucketBatchSampler, bucket_sizes, refuse_narrow_buckets, report_buckets
from training.data import ResumableBatchSampler, load_records
from training.evaluate import check_autoencoder_fit
from training.finetune import add_lora, export_lora, fused_lora_pipeline
from training.guard import StopGuard, check_finite, guarded
from runtime.files import file_digest
from training.latent_cache import build_latent_cache, cache_key, folder_digest, load_latent_cache
from training.ldm_config import LdmJobConfig, SampleConfig
from training.ldm_models import check_compatible, load_models
from training.runs import data_layout, due, resume_or_start, start_accelerator
from runtime import training_attention
from runtime.files import write_json_atomic
from training.tracking import RunLog
from training.utils import run_job, save_grid


class Denoiser(torch.nn.Module):
    """The trained part as one ``forward`` (so DDP synchronises all of it): the U-Net, and the text
    encoder when it trains jointly (then the step passes token ids instead of cached states)."""

    def __init__(self, unet, text_encoder: torch.nn.Module | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t, t, states=None, mask=None, input_ids=None):
        if input_ids is not None:  # (B, L, D); masked only for bidirectional encoders (CLIP: as at generation)
            states = self.text_encoder(input_ids, attention_mask=mask)[0] if mask is not None else self.text_encoder(input_ids)[0]
        return self.unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample


def step_randomness(seed: int, micro_batch: int, global_batch: int, latent_shape: tuple, rank: int, world: int) -> dict:
    """Every random draw of one micro-batch, made for the whole global batch from (seed, micro-batch)
    and sliced like the data ([rank::world]): a sample gets the same noise whatever the number of
    processes, and a resumed run the same as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * micro_batch + 1)
    draws = {
        "latent_noise": torch.randn(global_batch, *latent_shape, generator=g),  # posterior sample
        "eps": torch.randn(global_batch, *latent_shape, generator=g),  # diffusion noise
        "offset": torch.randn(global_batch, latent_shape[0], generator=g),
        "t": torch.randint(0, 1000, (global_batch,), generator=g),
        "drop": torch.rand(global_batch, generator=g),
    }
    return {k: v[rank::world] for k, v in draws.items()}


@guarded  # one run per output_dir; a signal before or after the steps stops at once
def train(cfg: LdmJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train (or resume) the latent U-Net; returns the exported ``pipeline/`` folder.
    ``stop_after_steps`` stops right after that step's checkpoint, as if killed there (tests)."""
    if cfg.model.init_from:
        check_pipeline_folder(cfg.model.init_from)  # a diffusers layout of safetensors files, nothing else
    out, t_cfg = Path(cfg.output_dir), cfg.train
    accelerator, threads = start_accelerator(t_cfg, cfg.seed, out)
    is_main, rank, world, device = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes, accelerator.device

    # 1. Data and models, checked against each other before anything expensive.
    records = load_records(cfg.data.path, cfg.data, captions=True)
    models = load_models(cfg)
    vae, tokenizer, text_encoder, unet, trains = models.vae.to(device), models.tokenizer, models.text_encoder, models.unet, models.text_trains
    check_compatible(unet, vae, text_encoder, cfg.data.resolution, models.vae_dir)
    fit = check_autoencoder_fit(vae, records, cfg, models.vae_dir) if is_main and cfg.model.check_images else None
    text_encoder.to(device).train(trains)
    lora = cfg.finetune.method == "lora"
    if lora:  # peft adapters on the attention projections; the base weights stay frozen
        add_lora(unet, text_encoder, cfg.finetune, trains)
    else:
        text_encoder.requires_grad_(trains)
    objective = DenoisingObjective(models.noise_scheduler, cfg.objective.min_snr_gamma, cfg.objective.offset_noise)

    # 2. The latent cache: encoded once, every process its share of the shards.
    #    A frozen text encoder's caption states are cached too, unless cache.text=false.
    #    With data.buckets, each image's latent at the shape of its bucket.
    cache_text = cfg.cache.text and not trains
    total = downsampling_factor(vae) * unet_downsampling(unet)
    sizes = bucket_sizes(cfg.data.buckets, cfg.data.resolution, total) if cfg.data.buckets.enabled else None
    if sizes:
        refuse_narrow_buckets(sizes, total, "the U-Net", cfg.data.resolution, accelerator)
    key = cache_key(file_digest(Path(models.vae_dir) / "diffusion_pytorch_model.safetensors"), cfg.data, records,
                    folder_digest(models.text_encoder_dir) if cache_text else None, sizes)  # fmt: skip
    folder = build_latent_cache(Path(cfg.cache.dir or out / "latent-cache"), key, vae, records, cfg.data,
                                (tokenizer, text_encoder) if cache_text else None, cfg.cache.batch_size, cfg.cache.shard_size,
                                show_progress=True, rank=rank, world_size=world, wait=accelerator.wait_for_everyone, buckets=sizes)  # fmt: skip
    cache = load_latent_cache(folder, records)
    conditioning = Conditioning(cache, tokenizer, text_encoder, trains, uses_attention_mask(text_encoder))

    # 3. Optimiser, LR schedule, EMA; resume.
    unet_params, optimizer, lr_sched, ema = _optimisation(unet, text_encoder if trains else None, t_cfg)
    model, optimizer = accelerator.prepare(Denoiser(unet, text_encoder if trains else None), optimizer)
    accelerator.register_for_checkpointing(lr_sched)
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    raw = accelerator.unwrap_model(model)
    layout = data_layout(t_cfg, accelerator, cfg.seed, sizes)
    state = resume_or_start(accelerator, out, cfg, layout, {"step": 0, "micro_batches": 0})
    step, micro = state["step"], state["micro_batches"]
    global_batch = t_cfg.batch_size * world
    if cache.sizes:  # each batch from one bucket; a small bucket fills its batches from its own images (reported below)
        sampler = BucketBatchSampler(cache.bucket_of, len(cache.sizes), t_cfg.batch_size, cfg.seed, start=micro, rank=rank,
                                     world_size=world, random_flip=cfg.data.random_flip)  # fmt: skip
        with_replacement = False
    else:
        sampler = ResumableBatchSampler(len(cache), t_cfg.batch_size, cfg.seed, start=micro, rank=rank, world_size=world,
                                        random_flip=cfg.data.random_flip, repeat_small=True)  # fmt: skip
        with_replacement = sampler.repeats > 1
        if is_main and with_replacement:
            print(f"{len(cache)} images, fewer than one global batch of {global_batch}: sampling with replacement")
    if is_main and cache.upscaled:
        target = "their bucket" if cache.sizes else f"data.resolution={cfg.data.resolution}"
        print(f"warning: {cache.upscaled} images are smaller than {target} and were upscaled")
    log = RunLog(accelerator, out, "train_ldm", cfg, step)
    log.write(step=step, event="resume" if step else "start", device=str(device), processes=world, cpu_threads=threads,
              mixed_precision=accelerator.mixed_precision, precision_reason=t_cfg.mixed_precision.reason(str(device)), cached_images=len(cache), upscaled_images=cache.upscaled, with_replacement=with_replacement,
              unet_parameters=sum(p.numel() for p in unet.parameters()), trained_parameters=sum(p.numel() for p in unet_params))  # fmt: skip
    if fit is not None:
        log.write(step=step, event="autoencoder_check", **fit)
    if cache.sizes and is_main:  # the whole bucket set, empty buckets too
        held = dict(zip(cache.sizes, torch.bincount(cache.bucket_of, minlength=len(cache.sizes)).tolist()))
        report_buckets(log, step, sizes, [held.get(size, 0) for size in sizes], global_batch)
    batches = iter(sampler)

    bar = tqdm(total=t_cfg.max_steps, initial=step, desc="latent diffusion", disable=not is_main, dynamic_ncols=True)
    window_start, window_loss, window_n, started = time.perf_counter(), 0.0, 0, time.perf_counter()
    stop = StopGuard(accelerator, out, bar)  # from here SIGTERM / SIGINT stop after the step, with a checkpoint
    while step < t_cfg.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        step_loss = 0.0
        for _ in range(t_cfg.grad_accum_steps):
            picks = next(batches)
            idx, flip = torch.tensor([i for i, _ in picks]), torch.tensor([f for _, f in picks])
            moments = _moments(cache, idx, flip)  # (B, 2C, h, w): h, w of the batch's bucket
            rnd = step_randomness(cfg.seed, micro, global_batch, (moments.shape[1] // 2, *moments.shape[2:]), rank, world)
            micro += 1
            x0 = normalize_latents(vae, sample_latents(moments, rnd["latent_noise"])).to(device)  # a fresh draw from each posterior
            t = rnd["t"].to(device)
            x_t, target = objective.noisy_input_and_target(x0, rnd["eps"].to(device), t, rnd["offset"])
            cond = conditioning(idx, rnd["drop"] < cfg.objective.caption_dropout, device)  # dropped captions become ""
            with accelerator.accumulate(model), accelerator.autocast():
                with training_attention(device):
                    pred = model(x_t, t, **cond)
                loss = objective.per_sample_loss(pred, target, t).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t_cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t_cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().item()
            window_n += 1
        window_loss += step_loss
        lr_sched.step()
        if ema is not None:
            ema.step(unet_params)
        step += 1
        bar.update(1)
        if stop.after_step(step, step_loss):  # a signal on any process (a non-finite loss raises)
            save_checkpoint(accelerator, out, step, {"micro_batches": micro, **layout}, t_cfg.keep_checkpoints)
            log.write(step=step, event="stopped", signal=stop.signal_name)
            raise stop.stopped(step)

        # 5. Logs, sample grids, checkpoints.
        if due(step, t_cfg.log_every, t_cfg.max_steps):
            mean_loss = accelerator.reduce(torch.tensor(window_loss / window_n, device=device), "mean").item()
            log.write(step=step, loss=round(mean_loss, 6), lr=lr_sched.get_last_lr()[0],
                      images_per_s=round(window_n * global_batch / (time.perf_counter() - window_start), 2))  # fmt: skip
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
        if is_main and due(step, t_cfg.sample_every, t_cfg.max_steps):
            with _ema_weights(ema, unet_params):
                grid = save_samples(_pipeline(vae, text_encoder, tokenizer, raw.unet, models.noise_scheduler), cfg.sample,
                                    out / "samples" / f"step-{step:08d}.png", sample_shapes(cache.sizes))  # fmt: skip
            log.images("samples", grid, step)
        if due(step, t_cfg.checkpoint_every, t_cfg.max_steps):
            save_checkpoint(accelerator, out, step, {"micro_batches": micro, **layout}, t_cfg.keep_checkpoints)
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "pipeline"
    bar.close()
    stop.disarm()

    # 6. Export: the pipeline (EMA weights, DPM++ on the training schedule); for LoRA also the
    #    adapters alone in diffusers' format, and the pipeline with them fused.
    if is_main:
        if ema is not None:
            ema.copy_to(unet_params)
        _export(cfg, models, raw.unet, vae, text_encoder if trains else None, out, steps=step, cached_images=len(cache),
                seconds=time.perf_counter() - started)  # fmt: skip
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return out / "pipeline"


def _moments(cache, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The cached posteriors (mean, log-variance) of images ``idx``, mirrored where ``flip``; x_0 is
    a fresh draw from each, normalised to unit variance by the autoencoder's scaling/shift factor."""
    moments = cache.moments[idx]  # (B, 2C, h, w)
    if cache.moments_flipped is not None:
        moments = torch.where(flip[:, None, None, None], cache.moments_flipped[idx], moments)
    return moments


def _optimisation(unet, trained_text_encoder, t_cfg) -> tuple[list, torch.optim.Optimizer, Any, EMAModel | None]:
    """(trained U-Net parameters, AdamW over them and the trained text encoder's, the LR schedule
    (stepped once per optimizer step), the U-Net's EMA or None). Fused AdamW and foreach EMA: one
    kernel over all parameters instead of one per tensor (train step 0.42 -> 0.39 s in
    benchmarks/training_throughput.py's setting)."""
    if t_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = [p for p in unet.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    groups = [{"params": unet_params, "lr": t_cfg.lr}]
    if trained_text_encoder is not None:
        groups.append({"params": [p for p in trained_text_encoder.parameters() if p.requires_grad], "lr": t_cfg.text_lr or t_cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=t_cfg.weight_decay, fused=True)
    lr_sched = get_scheduler(t_cfg.lr_schedule, optimizer, num_warmup_steps=t_cfg.lr_warmup_steps, num_training_steps=t_cfg.max_steps)
    ema = EMAModel(unet_params, decay=t_cfg.ema_decay, foreach=True) if t_cfg.ema_decay else None
    return unet_params, optimizer, lr_sched, ema


def _export(cfg: LdmJobConfig, models, unet, vae, trained_text_encoder, out: Path, *, steps: int, cached_images: int, seconds: float) -> Path:
    """``out/pipeline`` (and ``out/lora`` for a LoRA run) and ``out/metrics.json``, with the
    held-out evaluation when ``eval.num_prompts`` asks for it."""
    check_finite(unet, "U-Net")
    if trained_text_encoder is not None:
        check_finite(trained_text_encoder, "text encoder")
    if cfg.finetune.method == "lora":
        export_lora(unet, trained_text_encoder, out / "lora")
        pipe = fused_lora_pipeline(models.source, out / "lora", vae if cfg.model.replace_vae else None, models.noise_scheduler.config)
    else:
        pipe = _pipeline(vae, models.text_encoder, models.tokenizer, unet, make_scheduler("dpm++", models.noise_scheduler.config))
    pipe.save_pretrained(out / "pipeline")
    metrics = {"steps": steps, "train_seconds_this_run": round(seconds, 1), "cached_images": cached_images,
               "mixed_precision": cfg.train.mixed_precision.accelerate_name(str(unet.device)),
               "precision_reason": cfg.train.mixed_precision.reason(str(unet.device)),
               "final_loss": _last_logged(out / "log.jsonl", "loss")}  # fmt: skip
    if cfg.eval.num_prompts:
        from training.evaluate import evaluate_pipeline

        metrics["eval"] = evaluate_pipeline(out / "pipeline", cfg.data.path, cfg.eval.num_prompts, cfg.eval.steps, cfg.eval.guidance,
                                            seed=cfg.seed, data_cfg=cfg.data)  # fmt: skip
    metrics["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"saved {out / 'pipeline'}; metrics in {out / 'metrics.json'}")
    return out / "pipeline"


class _ema_weights:
    """Temporarily swap the EMA weights into the U-Net (for samples)."""

    def __init__(self, ema: EMAModel | None, params: list) -> None:
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def _pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def save_samples(pipe: LatentDiffusionPipeline, cfg: SampleConfig, path: Path, shapes: list | None = None) -> Path:
    """A grid with a row per validation prompt, the same seeds every time; with ``shapes`` ((height,
    width) in pixels), the row holds the prompt's images at each shape, each on a white cell of the
    largest height and width."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config)
    n, cells = cfg.images_per_prompt, []
    for height, width in shapes or [(None, None)]:  # None: the pipeline's default size
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(cfg.prompts) * n)]
        cells.append(pipe(list(cfg.prompts), height=height, width=width, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                          num_images_per_prompt=n, generator=generators, output_type="pt").images * 2 - 1)  # (P*n, 3, H, W)  # fmt: skip
    pipe.unet.train(was_training)
    H, W = max(c.shape[2] for c in cells), max(c.shape[3] for c in cells)
    cells = [F.pad(c, ((W - c.shape[3]) // 2, (W - c.shape[3] + 1) // 2, (H - c.shape[2]) // 2, (H - c.shape[2] + 1) // 2), value=1.0)
             for c in cells]  # fmt: skip
    rows = [torch.cat([c[i * n:(i + 1) * n] for c in cells]) for i in range(len(cfg.prompts))]
    return save_grid(rows, path, scale=2)


def sample_shapes(sizes: list | None) -> list | None:
    """The shapes of the sample grids with buckets: the tallest, the squarest and the widest bucket."""
    if not sizes:
        return None
    squarest = min(sizes, key=lambda s: abs(math.log(s[1] / s[0])))
    return list(dict.fromkeys([sizes[0], squarest, sizes[-1]]))  # sizes run from the tallest to the widest


def _last_logged(path: Path, key: str):
    import json

    value = None
    for line in path.read_text().splitlines():
        value = json.loads(line).get(key, value)
    return value


def main(argv: list[str] | None = None) -> None:
    run_job(train, parse_cli(LdmJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
