"""Distil a trained pipeline into a few-step student: latent consistency distillation (LCM), full or LoRA.

    accelerate launch -m training.distill --config configs/distill/openmoji-32.yaml [key=value ...]

``model.teacher`` is a pipeline folder (any this project exported, or a Stable-Diffusion one). Each step
draws a grid level n and a guidance scale w, noises the cached latents to level n on the teacher's own
path, lets the guided teacher take one ODE step to n - 1, and moves the student's consistency function
at n towards the target network's at n - 1 (the math: ``ldm/consistency.py``). A DDPM teacher is
distilled along DDIM, a flow teacher along its flow ODE's Euler step; the export's ``scheduler/`` is
``LCMScheduler`` or ``FlowMatchLCMScheduler``. Running the same command again on the same
``output_dir`` resumes exactly. At the end: ``output_dir/pipeline/`` (and ``output_dir/lora/`` for
``distill.method=lcm-lora``), with ``sampling.json`` (steps, guidance), and ``output_dir/metrics.json``.

The schema is ``training/distill_config.py``; the teacher, student and export ``training/stage2/student.py``;
the cache, captions and sample grids are stage 2's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from autoencoder import normalize_latents, sample_latents
from ldm.consistency import consistency_loss, guidance_embedding
from ldm.guidance import classifier_free_guidance
from ldm.text import uses_attention_mask
from runtime import training_attention
from runtime.errors import one_line_errors
from runtime.files import write_json_atomic
from training import run
from training.config import parse_cli, to_dict
from training.data.records import load_records
from training.distill_config import DistillJobConfig
from training.stage2.cache import open_latent_cache
from training.stage2.conditioning import Conditioning
from training.stage2.export import last_logged
from training.stage2.models import check_compatible
from training.stage2.randomness import step_randomness
from training.stage2.samples import ema_weights, pipeline_of, save_samples
from training.stage2.student import (
    StudentForward,
    build_student,
    consistency_of,
    export_student,
    load_teacher,
    student_guidance,
)
from training.run.guard import check_finite

SAMPLE_STEPS = [1, 2, 4]  # the sample grids' columns: the student at 1, 2 and 4 steps


@run.guarded  # one run per output_dir; a signal before or after the steps stops at once
def distill(cfg: DistillJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Distil (or resume distilling) ``model.teacher``; returns the exported student ``pipeline/`` folder.
    ``stop_after_steps`` stops right after that step's checkpoint, as if killed there (tests)."""
    out, train_cfg, d = Path(cfg.output_dir), cfg.train, cfg.distill
    teacher = load_teacher(cfg.model.teacher)  # a pipeline folder of safetensors, checked before anything else
    accelerator, threads = run.start_accelerator(train_cfg, cfg.seed, out)
    is_main, device = accelerator.is_main_process, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes

    # 1. Data, the teacher and the student, checked against each other before anything expensive.
    records = load_records(cfg.data.path, cfg.data, captions=True)
    check_compatible(teacher.unet, teacher.vae, teacher.text_encoder, cfg.data.resolution, teacher.vae_dir)
    path = consistency_of(teacher, d.grid)  # the teacher's path: flow or DDPM, its grid and its solver
    student = build_student(teacher, d).to(device)
    vae, text_encoder, teacher_unet = teacher.vae.to(device), teacher.text_encoder.to(device), teacher.unet.to(device)
    lcm = d.method == "lcm"  # a full student with a guidance embedding; else LoRA adapters at a fixed guidance

    # 2. The latent cache (stage 2's: reused when its key matches) and the stream of batches over it.
    cache = open_latent_cache(cfg, teacher, records, None, accelerator)
    conditioning = Conditioning(cache, teacher.tokenizer, text_encoder, False, uses_attention_mask(text_encoder))
    stream = cache.batch_stream(train_cfg.batch_size, cfg.seed, rank, world, cfg.data.random_flip)
    levels = {
        "n": lambda b, g: torch.randint(1, d.grid + 1, (b,), generator=g),  # the student's level; the teacher steps to n - 1
        "w": lambda b, g: d.guidance_min + (d.guidance_max - d.guidance_min) * torch.rand(b, generator=g),
    }

    # 3. Optimiser, LR schedule, EMA (of the export), the target network; resume.
    params = [p for p in student.parameters() if p.requires_grad]  # all of them, or the adapters
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    lr_sched = (horizon := run.Horizon.of(train_cfg, train_cfg.lr)).scheduler(optimizer)
    model, optimizer = accelerator.prepare(StudentForward(student), optimizer)
    ema = run.checkpoint_schedule_and_ema(accelerator, lr_sched, params, train_cfg, out)
    target = _target_network(student, d, accelerator)  # LCM: an EMA of the student (checkpointed); LCM-LoRA: None
    state = run.resume_or_start(accelerator, out, cfg, {**stream.layout, "grad_accum_steps": train_cfg.grad_accum_steps},
                                {"step": 0, "micro_batches": 0})  # fmt: skip
    step, micro = state["step"], state["micro_batches"]
    log = run.RunLog(accelerator, out, "distill", cfg, step)
    run.write_start(log, step, accelerator, train_cfg, threads, cached_images=len(cache), method=d.method,
                    teacher=cfg.model.teacher, trained_parameters=sum(p.numel() for p in params))  # fmt: skip
    batches = iter(stream.sampler(micro))
    budget = run.StepBudget(train_cfg, horizon, state, accelerator, optimizer, lr_sched)  # train.max_minutes
    target_net = StudentForward(target.module if target is not None else student)  # the raw modules: no DDP, no grad

    bar = tqdm(total=budget.max_steps, initial=step, desc="consistency distillation", disable=not is_main, dynamic_ncols=True)
    window, started = run.LossWindow(), time.perf_counter()
    stop = run.StopGuard(accelerator, out, train_cfg.keep_checkpoints, bar)  # SIGTERM / SIGINT: after the step, a checkpoint
    while step < budget.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        step_loss = 0.0
        for _ in range(train_cfg.grad_accum_steps):
            picks = next(batches)
            idx, flip = torch.tensor([i for i, _ in picks]), torch.tensor([f for _, f in picks])
            moments = cache.posteriors(idx, flip)  # (B, 2C, h, w)
            latent_shape = (moments.shape[1] // 2, *moments.shape[2:])
            draws = step_randomness(cfg.seed, micro, stream.global_batch, latent_shape, rank, world, levels)
            micro += 1
            x0 = normalize_latents(vae, sample_latents(moments, draws["latent_noise"])).to(device)  # (B, C, h, w)
            n, w = draws["n"], draws["w"] if lcm else torch.full_like(draws["w"], d.guidance)  # (B,) levels and guidance scales
            x_n = path.noised(x0, draws["eps"].to(device), n)
            cond = conditioning(
                idx, torch.zeros(len(idx), dtype=torch.bool), device, draws["caption_seed"]
            )  # one of its captions
            uncond = conditioning(idx, torch.ones(len(idx), dtype=torch.bool), device)  # the empty caption
            embedded = guidance_embedding(w).to(device) if lcm else None  # (B, 256)
            with torch.no_grad(), accelerator.autocast(), training_attention(device):
                wanted = consistency_target(teacher_unet, target_net, path, x_n, n, w, cond, uncond, embedded)
            with accelerator.accumulate(model), accelerator.autocast():
                with training_attention(device):
                    out_n = model(x_n, path.timestep(n).to(device), **cond, timestep_cond=embedded)
                loss = consistency_loss(path.consistency(x_n, n, out_n), wanted, d.distance, d.huber_c).mean()
                run.backward_and_step(accelerator, model, optimizer, loss, train_cfg.max_grad_norm)
            step_loss += loss.detach().item()
        window.add(step_loss, train_cfg.grad_accum_steps)
        run.after_optimizer_step(lr_sched, ema, params, bar)
        if target is not None:
            target.update_parameters(student)
        step += 1
        stopping = stop.after_step(step, step_loss)  # a signal on any process (a non-finite loss raises)
        budget.after_step(step, log, bar)

        # 5. Logs, sample grids (1, 2 and 4 steps), checkpoints.
        if stopping or run.due(step, train_cfg.log_every, budget.max_steps):
            window.write(log, step, lr_sched.get_last_lr()[0], stream.global_batch, bar)
        if stopping:
            raise stop.checkpoint_and_stop(step, {"micro_batches": micro, **stream.layout, **budget.state()}, log)
        if is_main and run.due(step, train_cfg.sample_every, budget.max_steps):
            with ema_weights(ema, params):
                pipe = pipeline_of(vae, text_encoder, teacher.tokenizer, student, path.scheduler())
                sample_cfg = cfg.sample if lcm else replace(cfg.sample, guidance=student_guidance(d))
                grid = save_samples(pipe, sample_cfg, out / "samples" / f"step-{step:08d}.png", step_counts=SAMPLE_STEPS)
            log.images("samples", grid, step)
        if run.due(step, train_cfg.checkpoint_every, budget.max_steps):
            run.save_checkpoint(accelerator, out, step, {"micro_batches": micro, **stream.layout, **budget.state()},
                                train_cfg.keep_checkpoints)  # fmt: skip
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "pipeline"

    # 6. Export: the student pipeline (LCM's scheduler on the teacher's schedule), its sampling.json, metrics.json.
    figures = {"steps": step, "train_seconds_this_run": round(time.perf_counter() - started, 1), "cached_images": len(cache)}
    run.finish(accelerator, stop, log, ema, params, lambda: _export(cfg, teacher, student, path, figures))
    return out / "pipeline"


def consistency_target(teacher_unet, target_net, path, x_n, n, w, cond: dict, uncond: dict, embedded) -> torch.Tensor:
    """(B, C, h, w), no gradient: the guided teacher's solver step from level n to n - 1 (its unconditional and
    conditional predictions in one batch, guidance scale ``w`` (B,) per sample), then the target network's consistency
    function at n - 1 (at n - 1 = 0 the step's end itself: the boundary condition)."""
    device = x_n.device
    masks = None if cond["mask"] is None else torch.cat([uncond["mask"], cond["mask"]])
    both = teacher_unet(torch.cat([x_n, x_n]), torch.cat([path.timestep(n)] * 2).to(device),
                        encoder_hidden_states=torch.cat([uncond["states"], cond["states"]]), encoder_attention_mask=masks).sample  # fmt: skip
    guided = classifier_free_guidance(*both.float().chunk(2), w.to(device).view(-1, 1, 1, 1))
    x_prev = path.solver_step(x_n, n, guided)
    return path.consistency(x_prev, n - 1, target_net(x_prev, path.timestep(n - 1).to(device), **cond, timestep_cond=embedded))


def _target_network(student, d, accelerator) -> AveragedModel | None:
    """LCM's target network: an EMA of the student (``distill.target_ema``), part of every checkpoint. LCM-LoRA's is
    the student itself: None."""
    if d.method != "lcm":
        return None
    target = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(d.target_ema), use_buffers=False).requires_grad_(False)
    accelerator.register_for_checkpointing(target)
    return target


def _export(cfg: DistillJobConfig, teacher, student, path, figures: dict) -> Path:
    """``output_dir/pipeline`` (and ``lora/``), and ``metrics.json`` with the held-out evaluation of the student at
    ``eval.steps`` and its own guidance, when ``eval.num_prompts`` asks for it. Refused if a weight is not finite."""
    out, d = Path(cfg.output_dir), cfg.distill
    check_finite(student, "student U-Net")
    folder = export_student(d, teacher, student, path.scheduler(), out)
    metrics = {**figures, "final_loss": last_logged(out / "log.jsonl", "loss")}
    if cfg.eval.num_prompts:
        from training.eval.pipeline import evaluate_pipeline

        metrics["eval"] = evaluate_pipeline(folder, cfg.data.path, cfg.eval.num_prompts, cfg.eval.steps, student_guidance(d),
                                            seed=cfg.seed, data_cfg=cfg.data, sampler="lcm")  # fmt: skip
    metrics["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", metrics)
    print(f"saved {folder}; metrics in {out / 'metrics.json'}")
    return folder


def main(argv: list[str] | None = None) -> None:
    """The command: what a user can act on (bad input, a busy output_dir, a full disk, a stop) ends it in one line."""
    with one_line_errors():
        distill(parse_cli(DistillJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
