"""Stage 2: train a text-conditional U-Net to denoise the latents of a frozen stage-1 autoencoder.

    accelerate launch -m training.train_ldm --config configs/ldm/openmoji-32.yaml [key=value ...]

The dataset is encoded once into a latent cache (posterior moments, and the caption states of a
frozen text encoder); training steps never run the autoencoder. Running the same command again
on the same ``output_dir`` resumes exactly. At the end: ``output_dir/pipeline/`` (diffusers
layout; the U-Net is the EMA one) and ``output_dir/metrics.json``.

The schema is ``training/ldm_config.py``; models ``training/stage2/models.py``; the cache
``training/stage2/cache.py``; each micro-batch ``training/stage2/batches.py``; the loss ``ldm/objective.py``;
captions ``training/stage2/conditioning.py``; LoRA ``training/stage2/finetune.py``; sample grids
``training/stage2/samples.py``; the validation loss ``training/stage2/validation.py``; DreamBooth's class images
``training/stage2/prior.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.pipeline import check_pipeline_folder
from ldm.sdxl import added_cond
from ldm.text import uses_attention_mask
from runtime import training_attention
from runtime.errors import one_line_errors
from training import run
from training.config import parse_cli
from training.data.buckets import bucket_sizes, refuse_narrow_buckets, report_buckets
from training.data.masks import check_masks
from training.data.records import load_records
from training.data.sampler import BatchStream
from training.ldm_config import LdmJobConfig, text_encoder_trains
from training.stage2.autoencoder_check import check_autoencoder_fit
from training.stage2.cache import open_latent_cache
from training.stage2.conditioning import Conditioning
from training.stage2.export import export_run
from training.stage2.models import Models, check_compatible, load_models, prepare_to_train, resolve_objective, training_objective
from training.stage2.batches import NoisyBatches
from training.stage2.prior import open_prior
from training.stage2.samples import ema_weights, pipeline_of, sample_shapes, save_samples
from training.stage2.validation import Validation, check_split


class UNetAndTextEncoder(torch.nn.Module):
    """What a stage-2 step trains, as one ``forward`` (DDP synchronises the gradients of what runs through
    ``forward``): the U-Net, and the text encoder when it trains jointly (then the step passes token ids
    instead of cached states). Returns the U-Net's output: eps or v, as the objective's target is."""

    def __init__(self, unet, text_encoder: torch.nn.Module | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t, t, states=None, mask=None, input_ids=None, pooled=None, time_ids=None):
        if input_ids is not None:  # (B, L, D); masked only for bidirectional encoders (CLIP: as at generation)
            out = self.text_encoder(input_ids, attention_mask=mask) if mask is not None else self.text_encoder(input_ids)
            states, pooled = out[0], out.pooler_output if getattr(self.text_encoder, "returns_pooled", False) else None
        # Stable Diffusion XL: the pooled caption embedding (B, P) and each image's size and crop (B, 6) too
        added = added_cond(pooled, time_ids) if time_ids is not None else None
        return self.unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask, added_cond_kwargs=added).sample


@run.guarded  # one run per output_dir; a signal before or after the steps stops at once
def train(cfg: LdmJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train (or resume) the latent U-Net; returns the exported ``pipeline/`` folder.
    ``stop_after_steps`` stops right after that step's checkpoint, as if killed there (tests)."""
    if cfg.model.init_from:
        check_pipeline_folder(cfg.model.init_from)  # a diffusers layout of safetensors files, nothing else
    cfg = resolve_objective(cfg)  # objective.type and shift: a fine-tune's are its folder's
    out, train_cfg = Path(cfg.output_dir), cfg.train
    accelerator, threads = run.start_accelerator(train_cfg, cfg.seed, out)
    is_main, device = accelerator.is_main_process, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes

    # 1. Data and models, checked against each other before anything expensive.
    records = load_records(cfg.data.path, cfg.data, captions=True)
    check_masks(records, cfg.data.mask)  # data.mask: a mask for every image, before any work
    check_split(cfg)  # eval.every needs the held-out split
    models = load_models(cfg)
    vae, tokenizer, text_encoder, unet = models.vae.to(device), models.tokenizer, models.text_encoder, models.unet
    trained_text_encoder = text_encoder if models.text_trains else None
    check_compatible(unet, vae, text_encoder, cfg.data.resolution, models.vae_dir)
    sizes = _bucket_sizes(cfg, models, accelerator)  # None: square crops
    autoencoder_fit = check_autoencoder_fit(vae, records, cfg, models.vae_dir) if is_main and cfg.model.check_images else None
    prepare_to_train(models, cfg.finetune, device)
    objective, sigmas = training_objective(cfg, models)  # sigmas: a flow objective's draws of its noise levels
    levels = {"sigma": sigmas} if sigmas is not None else None

    # 2. The latent cache (encoded once, every process its share) and the stream of batches over it.
    cache = open_latent_cache(cfg, models, records, sizes, accelerator)
    conditioning = Conditioning(
        cache, tokenizer, text_encoder, models.text_trains, uses_attention_mask(text_encoder), cfg.captions
    )
    stream = cache.batch_stream(train_cfg.batch_size, cfg.seed, rank, world, cfg.data.random_flip, bucket_set=sizes)

    # 3. Optimiser, LR schedule, EMA; resume.
    unet_params, optimizer, lr_sched, horizon = _optimisation(unet, trained_text_encoder, train_cfg)
    model, optimizer = accelerator.prepare(UNetAndTextEncoder(unet, trained_text_encoder), optimizer)
    ema = run.checkpoint_schedule_and_ema(accelerator, lr_sched, unet_params, train_cfg, out, trained_names(unet))
    named = _trained_by_name(unet, trained_text_encoder)  # eval.every: the validation loss, eval.keep_best its best weights
    validation = Validation(cfg, vae, objective, device, out, named) if is_main and cfg.eval.every else None
    prior = open_prior(cfg, models, accelerator, objective, levels) if cfg.prior.class_data else None  # base model's
    layout = {**stream.layout, "grad_accum_steps": train_cfg.grad_accum_steps}
    state = run.resume_or_start(accelerator, out, cfg, layout, {"step": 0, "micro_batches": 0})
    step, micro = state["step"], state["micro_batches"]
    log = run.RunLog(accelerator, out, "train_ldm", cfg, step)
    run.write_start(log, step, accelerator, train_cfg, threads, **_data_figures(cache, stream, unet, unet_params))
    _say_what_the_data_is(log, step, cfg, cache, stream, autoencoder_fit)
    batches = NoisyBatches(cache, stream, conditioning, objective, vae, cfg, levels, device, cfg.seed).start(micro)
    if prior is not None:  # prior.class_data: as many class images after the instance images of every micro-batch
        prior.batches.start(micro)
    budget = run.StepBudget(train_cfg, horizon, state, accelerator, optimizer, lr_sched)  # train.max_minutes

    bar = tqdm(total=budget.max_steps, initial=step, desc="latent diffusion", disable=not is_main, dynamic_ncols=True)
    window, started = run.LossWindow(), time.perf_counter()
    # from here SIGTERM / SIGINT stop after the step, with a checkpoint
    stop = run.StopGuard(accelerator, out, train_cfg.keep_checkpoints, bar)
    while step < budget.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        step_loss = 0.0
        for _ in range(train_cfg.grad_accum_steps):
            # the cached rows, a fresh latent from each posterior, the noise and level, captions, masks (batches.py)
            batch = batches.next(micro, rank, world)
            batch = prior.joined(batch, micro, rank, world) if prior is not None else batch
            micro += 1
            # the backward under the same attention kernel too: gradient checkpointing recomputes the forward there
            with accelerator.accumulate(model), accelerator.autocast(), training_attention(device):
                pred = model(batch.x_t, batch.t, **batch.cond)
                per_sample = objective.per_sample_loss(pred, batch.target, batch.level, batch.mask)  # data.mask's weights
                loss = prior.loss(per_sample) if prior is not None else per_sample.mean()
                run.backward_and_step(accelerator, model, optimizer, loss, train_cfg.max_grad_norm)
            step_loss += loss.detach().item()
        window.add(step_loss, train_cfg.grad_accum_steps)
        run.after_optimizer_step(lr_sched, ema, unet_params, bar)
        step += 1
        stopping = stop.after_step(step, step_loss)  # a signal on any process (a non-finite loss raises)
        budget.after_step(step, log, bar)  # with train.max_minutes: max_steps fixed from the measured step time

        # 5. Logs (the step a signal stops at too: its loss is in the curve), sample grids, checkpoints.
        if stopping or run.due(step, train_cfg.log_every, budget.max_steps):
            window.write(log, step, lr_sched.get_last_lr()[0], stream.global_batch, bar)
        if stopping:
            raise stop.checkpoint_and_stop(step, {"micro_batches": micro, **layout, **budget.state()}, log)
        if is_main and run.due(step, train_cfg.sample_every, budget.max_steps):
            with ema_weights(ema, unet_params), run.evaluation_weights(optimizer):
                pipe = pipeline_of(vae, text_encoder, tokenizer, unet, models.noise_scheduler)
                grid = save_samples(pipe, cfg.sample, out / "samples" / f"step-{step:08d}.png", sample_shapes(stream.sizes))
            log.images("samples", grid, step)
        if validation is not None and run.due(step, cfg.eval.every, budget.max_steps):
            with ema_weights(ema, unet_params), run.evaluation_weights(optimizer), accelerator.autocast():
                validation.score(step, log, unet, tokenizer, text_encoder)  # and keeps these weights if the best
        if run.due(step, train_cfg.checkpoint_every, budget.max_steps):
            run.save_checkpoint(
                accelerator, out, step, {"micro_batches": micro, **layout, **budget.state()}, train_cfg.keep_checkpoints
            )
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "pipeline"

    # 6. Export: the pipeline (EMA weights, DPM++ on the training schedule); for LoRA also the
    #    adapters alone in diffusers' format, and the pipeline with them fused.
    seconds = time.perf_counter() - started
    export = lambda: _export(cfg, models, out, step, len(cache), seconds, validation and validation.best)  # noqa: E731
    run.finish(accelerator, stop, log, ema, unet_params, export, optimizer)
    return out / "pipeline"


def _export(cfg: LdmJobConfig, models: Models, out: Path, step: int, images: int, seconds: float, best) -> None:
    """The run's exports: ``pipeline/`` (and ``lora/``) of the last weights; with eval.keep_best, ``best/`` beside it,
    of the weights of the lowest validation loss."""
    best = best if best is not None and best.record is not None else None
    extra = {"best": best.record} if best is not None else None
    export_run(cfg, models, out, step, images, seconds, extra=extra)
    if best is not None:
        best.load()
        export_run(cfg, models, out / "best", best.record["step"], images, seconds, out / "log.jsonl", extra)


def _bucket_sizes(cfg: LdmJobConfig, models: Models, accelerator) -> list | None:
    """The bucket set of ``data.buckets`` (None: off), in steps of the total downsampling by default; refused before
    any work where bf16 would compute one wrongly on this CPU."""
    if not cfg.data.buckets.enabled:
        return None
    sizes = bucket_sizes(cfg.data.buckets, cfg.data.resolution, models.downsampling)
    refuse_narrow_buckets(sizes, models.downsampling, "the U-Net", cfg.data.resolution, accelerator)
    return sizes


def _data_figures(cache, stream: BatchStream, unet, unet_params: list) -> dict:
    """What the start record says of the data and the model."""
    return {
        "cached_images": len(cache),
        "upscaled_images": cache.upscaled,
        "with_replacement": stream.with_replacement,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "trained_parameters": sum(p.numel() for p in unet_params),
    }


def _say_what_the_data_is(
    log: run.RunLog, step: int, cfg: LdmJobConfig, cache, stream: BatchStream, autoencoder_fit: dict | None
) -> None:
    """On the main process: the autoencoder check's figures, the bucket histogram (the whole set, empty buckets too)
    and the words a user should read before the steps (images drawn with replacement, upscaled images)."""
    if not log.accelerator.is_main_process:
        return
    if autoencoder_fit is not None:
        log.write(step=step, event="autoencoder_check", **autoencoder_fit)
    if stream.bucket_set:
        held = dict(zip(stream.sizes, stream.bucket_counts))  # the buckets that hold images
        report_buckets(log, step, stream.bucket_set, [held.get(size, 0) for size in stream.bucket_set], stream.global_batch)
    elif stream.with_replacement:
        print(f"{len(cache)} images, fewer than one global batch of {stream.global_batch}: sampling with replacement")
    if cfg.captions.per_step and cfg.cache.text and not text_encoder_trains(cfg):
        print(
            "note: captions.shuffle_tags / captions.tag_dropout change a caption every step: its states are encoded each step, not cached"
        )
    if cache.upscaled:
        target = "their bucket" if stream.bucket_set else f"data.resolution={cfg.data.resolution}"
        print(f"warning: {cache.upscaled} images are smaller than {target} and were upscaled")


def trained_names(unet) -> list[str]:
    """The names of the U-Net's trained parameters, in the order of ``_optimisation``'s list (post-hoc EMA snapshots)."""
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def _trained_by_name(unet, trained_text_encoder) -> dict:
    """What eval.keep_best keeps: every trained parameter (all the U-Net's, or its LoRA adapters; a trained text
    encoder's too), by name."""
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    if trained_text_encoder is not None:
        named |= {f"text_encoder.{n}": p for n, p in trained_text_encoder.named_parameters() if p.requires_grad}
    return named


def _optimisation(unet, trained_text_encoder, train_cfg) -> tuple[list, torch.optim.Optimizer, Any, run.Horizon]:
    """(trained U-Net parameters, AdamW over them and the trained text encoder's, the LR schedule
    (stepped once per optimizer step), its horizon (``train.max_steps`` until a time budget fixes it)). Fused AdamW (the default
    ``train.optimizer``) and foreach EMA: one kernel over all parameters instead of one per tensor (train step 0.42 -> 0.39 s in benchmarks/training_throughput.py's setting)."""
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = [p for p in unet.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    groups = [{"params": unet_params, "lr": train_cfg.lr}]
    if trained_text_encoder is not None:
        groups.append(
            {"params": [p for p in trained_text_encoder.parameters() if p.requires_grad], "lr": train_cfg.text_lr or train_cfg.lr}
        )
    optimizer = run.build_optimizer(groups, train_cfg)  # train.optimizer: AdamW (fused) unless it says otherwise
    horizon = run.Horizon.of(train_cfg, optimizer.defaults["lr"])
    return unet_params, optimizer, horizon.scheduler(optimizer), horizon


def main(argv: list[str] | None = None) -> None:
    """The command: what a user can act on (bad input, a busy output_dir, a full disk, a stop) ends it in one line."""
    with one_line_errors():
        train(parse_cli(LdmJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
