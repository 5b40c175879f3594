"""What every training job does around its loop, once: the shared run settings, the accelerator
and thread set-up, resume-or-start, and when a periodic action is due. Functions, not a Trainer:
each job's loop stays in its own file and calls these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

import runtime

from training.run.budget import WSD
from training.run.checkpoint import resume_from_latest
from training.config import ConfigError, MixedPrecision, save_config
from training.run.guard import StopGuard
from training.run.optim import check_optimizer, evaluation_weights
from training.run.posthoc_ema import MAX_SIGMA_REL, PowerEMA
from training.run.tracking import RunLog, tracker_names


@dataclass(frozen=True)
class EmaConfig:
    """``train.ema``: which EMA a run keeps. ``decay``: one EMA of ``train.ema_decay`` (null: none), chosen before the
    run, the export's weights. ``posthoc``: EDM2's two power-function profiles (``sigma_rels``), snapshotted every
    ``snapshot_every`` steps (null: ``checkpoint_every``) and at the end into ``output_dir/ema-snapshots/``; the export is
    the trained weights, and ``python -m training.posthoc_ema`` reconstructs any length after training."""

    kind: str = "decay"  # decay | posthoc
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """The ``train:`` settings both jobs share (each job's schema subclasses it, with its own
    defaults); checked when built."""

    batch_size: int = 32  # per process, per micro-batch
    grad_accum_steps: int = 1
    max_steps: int = 2000  # optimizer steps
    max_minutes: float | None = None  # a time budget for the steps (training/run/budget.py); max_steps stays the cap
    lr: float = 4e-4
    lr_schedule: str = "cosine"  # any diffusers.optimization schedule name, or warmup_stable_decay (training/run/budget.py)
    lr_warmup_steps: int = 100
    lr_decay_fraction: float = 0.2  # warmup_stable_decay: the last fraction of the steps, over which the LR decays to 0
    weight_decay: float = 0.0
    mixed_precision: MixedPrecision = MixedPrecision.auto  # auto | fp32 | bf16 | fp16
    ema_decay: float | None = None  # EMA of the trained weights (e.g. 0.999); the export is the EMA copy. None: off
    ema: EmaConfig = field(default_factory=EmaConfig)  # or post-hoc EMA (train.ema.kind=posthoc)
    optimizer: str = "adamw"  # adamw | adafactor | prodigy | schedule_free_adamw | adamw_8bit (training/run/optim.py)
    cpu_threads: int | None = (
        None  # None: the machine's cores / processes on it (overrides OMP_NUM_THREADS=1 from accelerate launch)
    )
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    sample_every: int = 500
    report_to: str = (
        "auto"  # experiment trackers (accelerate's): auto (TensorBoard if installed) | none | all | tensorboard,wandb,...
    )

    def __post_init__(self) -> None:
        validate_run(self)


def validate_run(train_cfg: RunConfig) -> None:
    """The rules of the shared fields (a ConfigError naming the key and what would be valid)."""
    for key in ("batch_size", "max_steps", "grad_accum_steps", "checkpoint_every", "log_every", "sample_every"):
        if getattr(train_cfg, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train_cfg, key)} must be >= 1")
    if train_cfg.max_minutes is not None and not train_cfg.max_minutes > 0:
        raise ConfigError(f"train.max_minutes={train_cfg.max_minutes} must be > 0 (or null for no time budget)")
    if train_cfg.ema_decay is not None and not 0.0 < train_cfg.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train_cfg.ema_decay} must be in (0, 1) (or null for no EMA)")
    _validate_ema(train_cfg)
    check_optimizer(train_cfg)
    tracker_names(train_cfg.report_to)  # unknown or not installed: said now, not after the cache is built
    if train_cfg.cpu_threads is not None and train_cfg.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads={train_cfg.cpu_threads} must be >= 1 (or null for all cores)")
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    names = [s.value for s in TYPE_TO_SCHEDULER_FUNCTION] + [WSD]
    if train_cfg.lr_schedule not in names:
        raise ConfigError(f"train.lr_schedule='{train_cfg.lr_schedule}' is unknown; valid: {', '.join(names)}")
    if not 0.0 < train_cfg.lr_decay_fraction <= 1.0:
        raise ConfigError(f"train.lr_decay_fraction={train_cfg.lr_decay_fraction} must be in (0, 1]")
    if train_cfg.lr_decay_fraction != RunConfig.lr_decay_fraction and train_cfg.lr_schedule != WSD:
        raise ConfigError(
            f"train.lr_decay_fraction would be ignored: it is for train.lr_schedule={WSD}, and this run's is {train_cfg.lr_schedule}"
        )


def refuse_stage2_only(train_cfg: RunConfig) -> None:
    """For the jobs other than the latent model's (the autoencoder, distillation): the ``train:`` settings only
    ``training.train_ldm`` implements so far, each refused in one line."""
    if train_cfg.ema.kind == "posthoc":
        raise ConfigError("train.ema.kind=posthoc is for the latent model (training.train_ldm) so far; here use decay")
    if train_cfg.optimizer != "adamw":
        raise ConfigError(
            f"train.optimizer={train_cfg.optimizer} is for the latent model (training.train_ldm) so far; here use adamw"
        )


def _validate_ema(train_cfg: RunConfig) -> None:
    ema = train_cfg.ema
    if ema.kind not in ("decay", "posthoc"):
        raise ConfigError(f"train.ema.kind='{ema.kind}' is unknown; valid: decay, posthoc")
    if ema.kind == "decay":
        return
    if train_cfg.ema_decay is not None:
        raise ConfigError(
            f"train.ema_decay={train_cfg.ema_decay} is the EMA of train.ema.kind=decay; a post-hoc run picks its EMA "
            "after training (python -m training.posthoc_ema): set train.ema_decay=null"
        )
    if len(ema.sigma_rels) < 2 or len(set(ema.sigma_rels)) != len(ema.sigma_rels):
        raise ConfigError(
            f"train.ema.sigma_rels={list(ema.sigma_rels)} must name at least two different lengths (EDM2: [0.05, 0.10])"
        )
    for s in ema.sigma_rels:
        if not 0.0 < s < MAX_SIGMA_REL:
            raise ConfigError(
                f"train.ema.sigma_rels: {s} must be in (0, {MAX_SIGMA_REL:.4f}) ({MAX_SIGMA_REL:.4f}: the mean of all the weights)"
            )
    if ema.snapshot_every is not None and ema.snapshot_every < 1:
        raise ConfigError(f"train.ema.snapshot_every={ema.snapshot_every} must be >= 1 (or null: train.checkpoint_every)")


def start_accelerator(train_cfg: RunConfig, seed: int, out: Path) -> tuple[Accelerator, int]:
    """The machine configured (:func:`runtime.configure`), the Accelerator for ``train_cfg`` (CUDA when there is one; the
    trackers of ``train_cfg.report_to`` writing under ``out/logs``), each process's share of the CPU cores, and the same
    seed everywhere (the same initial weights on every process). Returns (accelerator, threads)."""
    runtime.configure()  # before any kernel is built: some VMs advertise AMX that traps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError(  # accelerate would run it as plain DDP without a word: no sharding, a checkpoint of another layout
            "FSDP (configs/accelerate/fsdp.yaml) shards a model across GPUs, and this machine has none; on a CPU "
            "launch with configs/accelerate/cpu-2.yaml (DDP), or without --config_file"
        )
    accelerator = Accelerator(
        mixed_precision=train_cfg.mixed_precision.accelerate_name(device),
        gradient_accumulation_steps=train_cfg.grad_accum_steps,
        cpu=device == "cpu",
        log_with=tracker_names(train_cfg.report_to) or None,
        project_dir=Path(out) / "logs",
    )
    threads = torch.get_num_threads()
    if device == "cpu":
        threads = set_cpu_threads(train_cfg.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    set_seed(seed)
    return accelerator, threads


def resume_or_start(accelerator: Accelerator, out: Path, cfg, layout: dict, fresh: dict) -> dict:
    """Load the latest checkpoint of ``out`` into the prepared objects and return its trainer state,
    or ``fresh`` if there is none; the main process makes ``out`` and writes the run's config.yaml."""
    state = resume_from_latest(accelerator, out, layout) or dict(fresh)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if state.get("step"):
            print(f"resuming from step {state['step']} in {out}/checkpoints")
    return state


def write_start(log: RunLog, step: int, accelerator: Accelerator, train_cfg: RunConfig, threads: int, **figures) -> None:
    """The first log.jsonl record of a launch (``start``, or ``resume`` at ``step``): where it runs, on how many
    processes and threads, in which precision and why, and the job's own ``figures``."""
    device = str(accelerator.device)
    log.write(
        step=step,
        event="resume" if step else "start",
        device=device,
        processes=accelerator.num_processes,
        cpu_threads=threads,
        mixed_precision=accelerator.mixed_precision,
        precision_reason=train_cfg.mixed_precision.reason(device),
        **figures,
    )


def checkpoint_schedule_and_ema(
    accelerator: Accelerator, lr_schedule, params: list, train_cfg: RunConfig, out: Path, names: list[str] | None = None
) -> EMAModel | PowerEMA | None:
    """After ``accelerator.prepare``: the LR schedule, and the EMA of ``params`` (``names``: their names, for the
    post-hoc snapshots), made part of every checkpoint, in this order. ``train.ema.kind=decay``: one EMA of
    ``train.ema_decay`` (None when that is None), one foreach kernel over all parameters; ``posthoc``: the power-function
    profiles, snapshotted into ``out/ema-snapshots`` by the main process every ``snapshot_every`` steps."""
    accelerator.register_for_checkpointing(lr_schedule)
    ema_cfg = train_cfg.ema
    if ema_cfg.kind == "posthoc":
        every = ema_cfg.snapshot_every or train_cfg.checkpoint_every
        folder = out if accelerator.is_main_process else None
        ema = PowerEMA(params, names, ema_cfg.sigma_rels, folder, every).to(accelerator.device)
    elif train_cfg.ema_decay:
        ema = EMAModel(params, decay=train_cfg.ema_decay, foreach=True)
        ema.to(accelerator.device)
    else:
        return None
    accelerator.register_for_checkpointing(ema)
    return ema


def backward_and_step(accelerator: Accelerator, model, optimizer, loss: torch.Tensor, max_grad_norm: float | None) -> None:
    """Inside ``accelerator.accumulate``: the backward pass, the gradients clipped to ``max_grad_norm`` once they are
    synchronised (None or 0: not clipped), the optimizer's step and its gradients zeroed."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def after_optimizer_step(lr_schedule, ema: EMAModel | None, params: list, bar) -> None:
    """Once per optimizer step (not per micro-batch, not per process): the LR schedule's step, the EMA's, the bar's."""
    lr_schedule.step()
    if ema is not None:
        ema.step(params)
    bar.update(1)


def finish(
    accelerator: Accelerator, stop: StopGuard, log: RunLog, ema, params: list, export: Callable[[], object], optimizer=None
) -> None:
    """After the last step: signals stop at once again, the main process swaps the EMA weights in (when there is an EMA;
    a post-hoc EMA writes its last snapshots instead) and exports, and every process waits for it before the trackers close. The process group stays: it ends
    after the job's objects (:func:`training.run.guard.end_process_group`), not here, where the model still lives."""
    stop.disarm()
    if accelerator.is_main_process:
        if isinstance(ema, PowerEMA):
            ema.snapshot()  # the last step's, whatever snapshot_every is; the export is the trained weights
        elif ema is not None:
            ema.copy_to(params)
        with evaluation_weights(optimizer):  # a schedule-free optimizer's averaged weights
            export()
    accelerator.wait_for_everyone()
    log.close()


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, samples, checkpoint) runs after ``step``: every ``every`` steps and at the end."""
    return step % every == 0 or step == max_steps


def set_cpu_threads(requested: int | None, local_processes: int) -> int:
    """Give each process its share of the CPU cores and return the thread count used.

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless told otherwise (measured here: half
    the speed on 2 cores). ``requested=None`` means all cores this process may use, divided by
    the processes on this machine.
    """
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, cores // max(1, local_processes))
    torch.set_num_threads(requested)
    return requested
