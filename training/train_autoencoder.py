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
from tqdm.auto import tqdm

from autoencoder import (
    build_autoencoder,
    load_autoencoder,
)
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.latents import downsampling_factor, posterior
from autoencoder.losses import AutoencoderLoss
from autoencoder.perceptual import LPIPS
from runtime.errors import one_line_errors
from training.autoencoder_config import AutoencoderJobConfig
from training import run
from training.config import parse_cli
from training.data.buckets import assign_buckets, bucket_sizes, refuse_narrow_buckets, report_buckets
from training.data.loader import ReadableBatches, train_loader
from training.data.records import DataError, has_split, load_records
from training.data.sampler import BatchStream
from training.stage1.export import export_autoencoder
from training.stage1.samples import preview_batch, save_reconstructions


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


@run.guarded  # one run per output_dir; a signal before or after the steps stops at once
def train(cfg: AutoencoderJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train (or resume) the autoencoder described by ``cfg``; returns the exported ``vae/`` folder.
    ``stop_after_steps`` stops right after that step's checkpoint, as if killed there (tests)."""
    out, train_cfg = Path(cfg.output_dir), cfg.train
    accelerator, threads = run.start_accelerator(train_cfg, cfg.seed, out)  # the same initial weights on every process
    is_main, device = accelerator.is_main_process, accelerator.device

    # 1. Data, checked before anything expensive; with buckets, each image's from its header.
    records, held_out = _records(cfg)
    vae = _autoencoder(cfg)
    stream = _batch_stream(records, cfg, vae, accelerator)

    # 2. Networks and the loss (LPIPS weights are pretrained VGG16, frozen).
    disc, lpips, loss_fn, memory_format = _networks(cfg, vae, device)
    ae_params, opt_ae, opt_d, sched_ae, horizon = _optimisation(vae, disc, train_cfg)
    model, disc, opt_ae, opt_d = accelerator.prepare(Reconstruction(vae), disc, opt_ae, opt_d)
    ema = run.checkpoint_schedule_and_ema(accelerator, sched_ae, ae_params, train_cfg, out)
    unwrapped_disc = accelerator.unwrap_model(disc)
    last_layer = vae.decoder.conv_out.weight  # where the adaptive GAN weight is measured
    set_seed(cfg.seed + accelerator.process_index)  # same init everywhere; own posterior noise per rank

    # 3. Resume: models, optimizers, scheduler, RNG states; data position from trainer_state.
    layout = {**stream.layout, "grad_accum_steps": train_cfg.grad_accum_steps}
    state = run.resume_or_start(accelerator, out, cfg, layout, {"step": 0, "micro_batches": 0, "bad_images": 0})
    step, micro = state["step"], state["micro_batches"]
    log = run.RunLog(accelerator, out, "train_autoencoder", cfg, step)
    run.write_start(log, step, accelerator, train_cfg, threads, train_images=len(records))
    if stream.sizes:
        report_buckets(log, step, stream.sizes, stream.bucket_counts, stream.global_batch)
    # the next micro-batch with a readable image on every process; bad_images: per process, summed when reported
    batches = ReadableBatches(train_loader(records, cfg.data, stream, start=micro), accelerator, micro, state["bad_images"])
    # fixed images for sample grids and a running held-out PSNR (up to eval.batch_size of them)
    preview = preview_batch(held_out if held_out is not None else records, cfg, cfg.eval.batch_size)

    budget = run.StepBudget(train_cfg, horizon, state, accelerator, opt_ae, sched_ae, (loss_fn.gan_start,))  # GAN steps cost more

    def trainer_state() -> dict:  # a collective: every process calls it
        return {"micro_batches": batches.micro_batches, "bad_images": batches.total_bad(), **layout, **budget.state()}

    bar = tqdm(total=budget.max_steps, initial=step, desc="autoencoder", disable=not is_main, dynamic_ncols=True)
    window_start, window_images, window = time.perf_counter(), 0, {}
    # from here SIGTERM / SIGINT stop after the step, with a checkpoint
    stop = run.StopGuard(accelerator, out, train_cfg.keep_checkpoints, bar)
    while step < budget.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        use_gan = loss_fn.gan_active(step)
        gan_disc = unwrapped_disc if use_gan else None
        step_loss = 0.0  # every logged term of every micro-batch: one NaN anywhere shows
        lr = sched_ae.get_last_lr()[0]
        for _ in range(train_cfg.grad_accum_steps):
            x = next(batches)["pixel_values"].to(device, memory_format=memory_format)  # (B, 3, H, W) in [-1, 1]
            window_images += x.shape[0] * accelerator.num_processes
            with accelerator.accumulate(model, disc), accelerator.autocast():
                # 4a. autoencoder: reconstruct from a posterior sample; the GAN term uses the
                # unwrapped discriminator with frozen weights so no gradient reaches it.
                x_hat, moments = model(x)  # (B, 3, H, W), (B, 2C, h, w)
                unwrapped_disc.requires_grad_(False)
                loss_ae, logs = loss_fn.generator_loss(x, x_hat, posterior(moments), step, last_layer, gan_disc)
                unwrapped_disc.requires_grad_(True)
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
        run.after_optimizer_step(sched_ae, ema, ae_params, bar)
        step += 1
        stopping = stop.after_step(step, step_loss)  # a signal on any process (a non-finite loss raises)
        budget.after_step(step, log, bar)

        # 5. Logs (the step a signal stops at too: its loss is in the curve), sample grids, checkpoints.
        if stopping or run.due(step, train_cfg.log_every, budget.max_steps):
            elapsed = time.perf_counter() - window_start
            n = window.pop("n")
            means = {k: round(v / n, 6) for k, v in window.items()}
            log.write(step=step, lr=lr, images_per_s=round(window_images / elapsed, 2), bad_images=batches.total_bad(), **means)
            bar.set_postfix(l1=f"{means['l1']:.4f}", lpips=f"{means['lpips']:.3f}")
            window_start, window_images, window = time.perf_counter(), 0, {}
        if stopping:
            raise stop.checkpoint_and_stop(step, trainer_state(), log)
        if is_main and run.due(step, train_cfg.sample_every, budget.max_steps):
            grid = out / "samples" / f"step-{step:08d}.png"
            val_psnr = save_reconstructions(vae, preview, grid)
            log.write(step=step, val_psnr=round(val_psnr, 3), val_images=preview.shape[0])
            log.images("reconstructions", grid, step)
        if run.due(step, train_cfg.checkpoint_every, budget.max_steps):
            run.save_checkpoint(accelerator, out, step, trainer_state(), train_cfg.keep_checkpoints)
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "vae"
    # 6. Export: fit the latent scale, save vae/ in the diffusers layout, held-out metrics.
    bad_images = batches.total_bad()
    run.finish(
        accelerator,
        stop,
        log,
        ema,
        ae_params,
        lambda: export_autoencoder(vae, records, held_out, lpips, cfg, out, bad_images, step),
    )
    return out / "vae"


def _records(cfg: AutoencoderJobConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(the training images: data.path and every extra_data folder, the held-out split or None)."""
    for key, paths in (("extra_data", cfg.extra_data), ("eval.ood", cfg.eval.ood)):
        for path in paths:
            if not Path(path).is_dir():
                raise DataError(f"{key}: '{path}' is not a folder (make data builds data/generic-32 and data/ood-32/*)")
    records = load_records(cfg.data.path, cfg.data)
    if cfg.extra_data:
        records = datasets.concatenate_datasets([records, *(load_records(p, replace(cfg.data, path=p)) for p in cfg.extra_data)])
    has_held_out = has_split(cfg.data.path, cfg.data.eval_split)
    return records, load_records(cfg.data.path, cfg.data, cfg.data.eval_split) if has_held_out else None


def _autoencoder(cfg: AutoencoderJobConfig) -> AutoencoderKL:
    """The autoencoder to fine-tune (model.init_from), or a new one of model.preset."""
    if cfg.model.init_from:
        return load_autoencoder(cfg.model.init_from)
    m = cfg.model
    return build_autoencoder(m.preset, cfg.data.resolution, latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups)


def _batch_stream(records, cfg: AutoencoderJobConfig, vae: AutoencoderKL, accelerator) -> BatchStream:
    """The run's batches: square crops, or one aspect-ratio bucket per batch (each image's read from its header;
    refused before any step where bf16 would compute a bucket wrongly on this CPU)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if not cfg.data.buckets.enabled:
        return BatchStream(len(records), cfg.train.batch_size, cfg.seed, rank, world, cfg.data.random_flip)
    sizes = bucket_sizes(cfg.data.buckets, cfg.data.resolution, downsampling_factor(vae))
    refuse_narrow_buckets(sizes, downsampling_factor(vae), "the encoder", cfg.data.resolution, accelerator)
    bucket_of = assign_buckets([row["image"] for row in records.select_columns(["image"])], sizes)
    return BatchStream(len(records), cfg.train.batch_size, cfg.seed, rank, world, cfg.data.random_flip, sizes, bucket_of)


def _networks(cfg: AutoencoderJobConfig, vae: AutoencoderKL, device) -> tuple:
    """(the patch discriminator, LPIPS, the loss, the memory format): every network in the run's memory format."""
    disc = PatchDiscriminator(channels=cfg.loss.disc_channels, num_layers=cfg.loss.disc_layers)
    lpips = LPIPS.pretrained().to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for net in (vae, disc, lpips):
        net.to(memory_format=memory_format)
    return disc, lpips, AutoencoderLoss(lpips, cfg.loss), memory_format


def _optimisation(
    vae: AutoencoderKL, disc, train_cfg
) -> tuple[list, torch.optim.Optimizer, torch.optim.Optimizer, object, run.Horizon]:
    """(trained autoencoder parameters, AdamW over them, AdamW over the discriminator, the autoencoder's LR schedule,
    its horizon).
    With ``decoder_only`` the encoder and quant_conv, which define the latent space, stay frozen. The discriminator's
    LR stays constant, as in the reference recipe; the schedule is stepped once per optimizer step (not per process)."""
    if train_cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    ae_params = [p for p in vae.parameters() if p.requires_grad]
    betas, decay = (train_cfg.adam_beta1, train_cfg.adam_beta2), train_cfg.weight_decay
    opt_ae = torch.optim.AdamW(ae_params, lr=train_cfg.lr, betas=betas, weight_decay=decay, fused=True)
    opt_d = torch.optim.AdamW(
        disc.parameters(), lr=train_cfg.disc_lr or train_cfg.lr, betas=betas, weight_decay=decay, fused=True
    )
    horizon = run.Horizon.of(train_cfg, opt_ae.defaults["lr"])
    return ae_params, opt_ae, opt_d, horizon.scheduler(opt_ae), horizon


def main(argv: list[str] | None = None) -> None:
    """The command: what a user can act on (bad input, a busy output_dir, a full disk, a stop) ends it in one line."""
    with one_line_errors():
        train(parse_cli(AutoencoderJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
