"""Stage 1: train the autoencoder (AutoencoderKL) with L1 + LPIPS + KL + an adaptive PatchGAN.

    accelerate launch -m training.train_autoencoder --config configs/autoencoder/openmoji-32-f4.yaml [key=value ...]

Running the same command again on the same ``output_dir`` resumes from the latest checkpoint.
At the end: ``output_dir/vae/`` (diffusers layout, fitted scaling_factor) and ``metrics.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import datasets
import torch
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from autoencoder import (
    build_autoencoder,
    fit_latent_normalization,
    latent_normalization,
    load_autoencoder,
    save_autoencoder,
    set_latent_normalization,
)
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.latents import downsampling_factor
from autoencoder.losses import AutoencoderLoss
from autoencoder.metrics import psnr, reconstruct
from autoencoder.perceptual import LPIPS
from autoencoder.references import pca_fits
from training.checkpoint import save_checkpoint
from training.config import parse_cli, to_dict
from training.autoencoder_config import AutoencoderJobConfig
from training.data import DataError, eval_loader, has_split, load_records, spread_indices, train_loader
from training.evaluate import autoencoder_report, load_images, ood_sets
from training.guard import StopGuard, check_finite, guarded
from training.runs import data_layout, due, resume_or_start, start_accelerator
from runtime.files import write_json_atomic
from training.buckets import assign_buckets, bucket_sizes, refuse_narrow_buckets, report_buckets
from training.tracking import RunLog
from training.utils import run_job, save_grid


class Reconstruction(torch.nn.Module):
    """encode -> posterior sample -> decode as one ``forward``: DistributedDataParallel only
    synchronises gradients of what runs through ``forward``, so ``vae.encode`` cannot be
    called on the wrapped model directly."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        x_hat = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        return x_hat, posterior.parameters  # moments (B, 2C, h, w): mean and logvar


@guarded  # one run per output_dir; a signal before or after the steps stops at once
def train(cfg: AutoencoderJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train (or resume) the autoencoder described by ``cfg``; returns the exported ``vae/`` folder.

    ``stop_after_steps`` stops right after that step's checkpoint, as if the run were killed
    there (used by the resume tests).
    """
    for key, paths in (("extra_data", cfg.extra_data), ("eval.ood", cfg.eval.ood)):
        for path in paths:
            if not Path(path).is_dir():
                raise DataError(f"{key}: '{path}' is not a folder (make data builds data/generic-32 and data/ood-32/*)")
    out = Path(cfg.output_dir)
    accelerator, threads = start_accelerator(cfg.train, cfg.seed, out)  # the same initial weights on every process
    is_main = accelerator.is_main_process

    # 1. Data, checked before anything expensive.
    records = load_records(cfg.data.path, cfg.data)
    if cfg.extra_data:
        records = datasets.concatenate_datasets([records, *(load_records(p, replace(cfg.data, path=p)) for p in cfg.extra_data)])
    held_out = load_records(cfg.data.path, cfg.data, cfg.data.eval_split) if has_split(cfg.data.path, cfg.data.eval_split) else None
    # 2. Networks and the loss (LPIPS weights are pretrained VGG16, frozen).
    if cfg.model.init_from:
        vae = load_autoencoder(cfg.model.init_from)
    else:
        vae = build_autoencoder(cfg.model.preset, cfg.data.resolution, latent_channels=cfg.model.latent_channels,
                                norm_num_groups=cfg.model.norm_num_groups)
    disc = PatchDiscriminator(channels=cfg.loss.disc_channels, num_layers=cfg.loss.disc_layers)
    lpips = LPIPS.pretrained().to(accelerator.device)
    loss_fn = AutoencoderLoss(lpips, cfg.loss)
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    if cfg.train.decoder_only:  # encoder and quant_conv define the latent space: frozen
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    ae_params = [p for p in vae.parameters() if p.requires_grad]
    opt_ae = torch.optim.AdamW(ae_params, lr=cfg.train.lr, betas=betas, weight_decay=cfg.train.weight_decay, fused=True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr or cfg.train.lr, betas=betas, weight_decay=cfg.train.weight_decay, fused=True)
    # The autoencoder's LR follows train.lr_schedule; the discriminator's stays constant, as in
    # the reference recipe. The scheduler is stepped once per optimizer step (not per process).
    sched_ae = get_scheduler(cfg.train.lr_schedule, opt_ae, num_warmup_steps=cfg.train.lr_warmup_steps,
                             num_training_steps=cfg.train.max_steps)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for net in (vae, disc, lpips):
        net.to(memory_format=memory_format)
    model, disc, opt_ae, opt_d = accelerator.prepare(Reconstruction(vae), disc, opt_ae, opt_d)
    accelerator.register_for_checkpointing(sched_ae)
    ema = EMAModel(ae_params, decay=cfg.train.ema_decay, foreach=True) if cfg.train.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    raw_vae, raw_disc = accelerator.unwrap_model(model).vae, accelerator.unwrap_model(disc)
    last_layer = raw_vae.decoder.conv_out.weight  # where the adaptive GAN weight is measured
    set_seed(cfg.seed + accelerator.process_index)  # same init everywhere; own posterior noise per rank

    # 3. Resume: models, optimizers, scheduler, RNG states; data position from trainer_state.
    sizes = bucket_sizes(cfg.data.buckets, cfg.data.resolution, downsampling_factor(raw_vae)) if cfg.data.buckets.enabled else None
    if sizes:
        refuse_narrow_buckets(sizes, downsampling_factor(raw_vae), "the encoder", cfg.data.resolution, accelerator)
    layout = data_layout(cfg.train, accelerator, cfg.seed, sizes)
    state = resume_or_start(accelerator, out, cfg, layout, {"step": 0, "micro_batches": 0, "bad_images": 0})
    step, micro = state["step"], state["micro_batches"]
    bad_images = state["bad_images"] if is_main else 0  # per-process count; summed when reported
    log = RunLog(accelerator, out, "train_autoencoder", cfg, step)
    log.write(step=step, event="resume" if step else "start", device=str(accelerator.device), processes=accelerator.num_processes,
              cpu_threads=threads, mixed_precision=accelerator.mixed_precision,
              precision_reason=cfg.train.mixed_precision.reason(str(accelerator.device)), train_images=len(records))
    buckets = _buckets(records, sizes, cfg.train.batch_size * accelerator.num_processes, log, step) if sizes else None
    loader = train_loader(records, cfg.data, cfg.train.batch_size, cfg.seed, start_batch=micro,
                          rank=accelerator.process_index, world_size=accelerator.num_processes, buckets=buckets)
    batches = iter(loader)
    # fixed images for sample grids and a running held-out PSNR (up to eval.batch_size of them)
    preview = _preview_batch(held_out if held_out is not None else records, cfg, cfg.eval.batch_size)

    def next_batch() -> dict:
        """The next micro-batch with at least one readable image on every process (all processes
        skip together, so they stay at the same position in the data)."""
        nonlocal micro, bad_images
        while True:
            batch = next(batches)
            micro += 1
            bad_images += len(batch["bad_files"])
            empty = torch.tensor(float(batch["pixel_values"].numel() == 0), device=accelerator.device)
            if accelerator.num_processes > 1:
                empty = accelerator.reduce(empty, "sum")
            if empty.item() == 0:
                return batch

    def total_bad() -> int:
        return int(accelerator.reduce(torch.tensor(bad_images, device=accelerator.device), "sum").item())

    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="autoencoder", disable=not is_main, dynamic_ncols=True)
    window_start, window_images, window = time.perf_counter(), 0, {}
    stop = StopGuard(accelerator, out, bar)  # from here SIGTERM / SIGINT stop after the step, with a checkpoint
    while step < cfg.train.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        use_gan = loss_fn.gan_active(step)
        step_loss = 0.0  # every logged term of every micro-batch: one NaN anywhere shows
        lr = sched_ae.get_last_lr()[0]
        for _ in range(cfg.train.grad_accum_steps):
            x = next_batch()["pixel_values"].to(accelerator.device, memory_format=memory_format)  # (B, 3, H, W) in [-1, 1]
            window_images += x.shape[0] * accelerator.num_processes
            with accelerator.accumulate(model, disc), accelerator.autocast():
                # 4a. autoencoder: reconstruct from a posterior sample; the GAN term uses the
                # unwrapped discriminator with frozen weights so no gradient reaches it.
                x_hat, moments = model(x)  # (B, 3, H, W), (B, 2C, h, w)
                posterior = DiagonalGaussianDistribution(moments)
                raw_disc.requires_grad_(False)
                loss_ae, logs = loss_fn.generator_loss(x, x_hat, posterior, step, last_layer, raw_disc if use_gan else None)
                raw_disc.requires_grad_(True)
                accelerator.backward(loss_ae)
                opt_ae.step()  # accelerate skips it until the last micro-batch
                opt_ae.zero_grad(set_to_none=True)
                # 4b. discriminator: hinge loss on real vs the (detached) reconstructions.
                if use_gan:
                    loss_d, d_logs = loss_fn.discriminator_loss(disc, x, x_hat.detach())
                    accelerator.backward(loss_d)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs |= d_logs
            step_loss += math.fsum(logs.values())
            for k, v in logs.items():  # averaged over the log window
                window[k] = window.get(k, 0.0) + v
            window["n"] = window.get("n", 0) + 1
        sched_ae.step()
        if ema is not None:
            ema.step(ae_params)
        step += 1
        bar.update(1)
        if stop.after_step(step, step_loss):  # a signal on any process (a non-finite loss raises)
            save_checkpoint(accelerator, out, step, {"micro_batches": micro, "bad_images": total_bad(), **layout},
                            cfg.train.keep_checkpoints)  # fmt: skip
            log.write(step=step, event="stopped", signal=stop.signal_name)
            raise stop.stopped(step)

        # 5. Logs, sample grids, checkpoints.
        if due(step, cfg.train.log_every, cfg.train.max_steps):
            elapsed = time.perf_counter() - window_start
            n = window.pop("n")
            means = {k: round(v / n, 6) for k, v in window.items()}
            log.write(step=step, lr=lr, images_per_s=round(window_images / elapsed, 2), bad_images=total_bad(), **means)
            bar.set_postfix(l1=f"{means['l1']:.4f}", lpips=f"{means['lpips']:.3f}")
            window_start, window_images, window = time.perf_counter(), 0, {}
        if is_main and due(step, cfg.train.sample_every, cfg.train.max_steps):
            grid = out / "samples" / f"step-{step:08d}.png"
            val_psnr = _save_reconstructions(raw_vae, preview, grid)
            log.write(step=step, val_psnr=round(val_psnr, 3), val_images=preview.shape[0])
            log.images("reconstructions", grid, step)
        if due(step, cfg.train.checkpoint_every, cfg.train.max_steps):
            save_checkpoint(accelerator, out, step, {"micro_batches": micro, "bad_images": total_bad(), **layout},
                            cfg.train.keep_checkpoints)
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "vae"
    bar.close()
    stop.disarm()
    bad_images = total_bad()
    if bad_images and is_main:
        print(f"skipped {bad_images} unreadable image(s); see log.jsonl")

    # 6. Export: fit the latent scale, save vae/ in the diffusers layout, held-out metrics.
    if is_main:
        if ema is not None:
            ema.copy_to(ae_params)
        _export(raw_vae, records, held_out, lpips, cfg, out, bad_images)
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return out / "vae"


def _buckets(records, sizes: list, global_batch: int, log, step: int) -> tuple[list, list[int]]:
    """The bucket sizes and each training image's bucket (read from the image headers), reported."""
    bucket_of = assign_buckets([row["image"] for row in records.select_columns(["image"])], sizes)
    report_buckets(log, step, sizes, [bucket_of.count(b) for b in range(len(sizes))], global_batch)
    return sizes, bucket_of


def _preview_batch(records, cfg: AutoencoderJobConfig, n: int) -> torch.Tensor:
    """``n`` images spread evenly over the split (neighbours are often near-duplicates)."""
    loader = eval_loader(records.select(spread_indices(len(records), n)), cfg.data, n)
    x = next(iter(loader))["pixel_values"]
    if x.numel() == 0:
        raise DataError(f"none of the {n} preview images (sample grids, val_psnr) could be read")
    return x


@torch.no_grad()
def _save_reconstructions(vae, x: torch.Tensor, path: Path, rows: int = 8) -> float:
    """Saves input over reconstruction (posterior mean, fp32) for ``rows`` images; returns PSNR over all of ``x``."""
    was_training = vae.training
    vae.eval()
    x = x.to(vae.device)
    x_hat = reconstruct(vae, x)
    vae.train(was_training)
    save_grid([x[:rows], x_hat[:rows]], path, scale=4)
    return psnr((x + 1) / 2, (x_hat + 1) / 2).mean().item()


def _export(vae, records, held_out, lpips: LPIPS, cfg: AutoencoderJobConfig, out: Path, bad_images: int) -> Path:
    check_finite(vae, "autoencoder")
    vae.eval()
    fit_batch = min(cfg.eval.batch_size, len(records))
    fit_loader = train_loader(records, cfg.data, fit_batch, seed=cfg.seed + 1)
    n_fit = min(cfg.train.scale_fit_batches, math.ceil(len(records) / fit_batch))  # about one pass at most
    fit_batches = (b["pixel_values"] for b, _ in zip(fit_loader, range(n_fit)) if b["pixel_values"].numel())
    if cfg.train.decoder_only:  # the latent space did not change: keep its normalisation
        scale, shift = latent_normalization(vae)
    else:
        scale, shift = fit_latent_normalization(vae, fit_batches, fit_shift=cfg.train.fit_shift)
        set_latent_normalization(vae, scale, shift)
    vae_dir = save_autoencoder(vae, out / "vae")
    metrics: dict = {"scaling_factor": scale, "shift_factor": shift, "steps": cfg.train.max_steps, "bad_images": bad_images,
                     "mixed_precision": cfg.train.mixed_precision.accelerate_name(str(vae.device)),
                     "precision_reason": cfg.train.mixed_precision.reason(str(vae.device))}
    if held_out is not None:  # in domain first, then every eval.ood folder; each beside bicubic and PCA
        if cfg.eval.max_images:
            held_out = held_out.select(range(min(cfg.eval.max_images, len(held_out))))
        sets = {cfg.data.eval_split: load_images(held_out, cfg.data)}
        sets |= ood_sets(cfg.eval.ood, cfg.data.resolution, cfg.eval.max_images)
        train_images = load_images(records, cfg.data, cfg.eval.pca_fit_images) if pca_fits(cfg.data.resolution) else None
        with torch.no_grad():
            metrics |= autoencoder_report(vae, sets, train_images, lpips, cfg.eval.batch_size)
    metrics["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"saved {vae_dir}; metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return vae_dir


def main(argv: list[str] | None = None) -> None:
    run_job(train, parse_cli(AutoencoderJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
