"""What every training job does around its loop, once: the shared run settings, the accelerator
and thread set-up, resume-or-start, and when a periodic action is due. Functions, not a Trainer:
each job's loop stays in its own file and calls these."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import runtime

from training.checkpoint import resume_from_latest
from training.config import ConfigError, MixedPrecision, save_config
from training.tracking import tracker_names
from training.utils import set_cpu_threads


@dataclass(frozen=True)
class RunConfig:
    """The ``train:`` settings both jobs share (each job's schema subclasses it, with its own
    defaults); checked when built."""

    batch_size: int = 32  # per process, per micro-batch
    grad_accum_steps: int = 1
    max_steps: int = 2000  # optimizer steps
    lr: float = 4e-4
    lr_schedule: str = "cosine"  # any diffusers.optimization schedule name
    lr_warmup_steps: int = 100
    weight_decay: float = 0.0
    mixed_precision: MixedPrecision = MixedPrecision.auto  # auto | fp32 | bf16 | fp16
    ema_decay: float | None = None  # EMA of the trained weights (e.g. 0.999); the export is the EMA copy. None: off
    cpu_threads: int | None = None  # None: the machine's cores / processes on it (overrides OMP_NUM_THREADS=1 from accelerate launch)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    sample_every: int = 500
    report_to: str = "auto"  # experiment trackers (accelerate's): auto (TensorBoard if installed) | none | all | tensorboard,wandb,...

    def __post_init__(self) -> None:
        validate_run(self)


def validate_run(t: RunConfig) -> None:
    """The rules of the shared fields (a ConfigError naming the key and what would be valid)."""
    for key in ("batch_size", "max_steps", "grad_accum_steps", "checkpoint_every", "log_every", "sample_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in (0, 1) (or null for no EMA)")
    tracker_names(t.report_to)  # unknown or not installed: said now, not after the cache is built
    if t.cpu_threads is not None and t.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads={t.cpu_threads} must be >= 1 (or null for all cores)")
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    names = [s.value for s in TYPE_TO_SCHEDULER_FUNCTION]
    if t.lr_schedule not in names:
        raise ConfigError(f"train.lr_schedule='{t.lr_schedule}' is unknown; valid: {', '.join(names)}")


def start_accelerator(t: RunConfig, seed: int, out: Path) -> tuple[Accelerator, int]:
    """The machine configured (:func:`runtime.configure`), the Accelerator for ``t`` (CUDA when there is one; the
    trackers of ``t.report_to`` writing under ``out/logs``), each process's share of the CPU cores, and the same
    seed everywhere (the same initial weights on every process). Returns (accelerator, threads)."""
    runtime.configure()  # before any kernel is built: some VMs advertise AMX that traps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=t.mixed_precision.accelerate_name(device),
                              gradient_accumulation_steps=t.grad_accum_steps, cpu=device == "cpu",
                              log_with=tracker_names(t.report_to) or None, project_dir=Path(out) / "logs")  # fmt: skip
    threads = torch.get_num_threads()
    if device == "cpu":
        threads = set_cpu_threads(t.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    set_seed(seed)
    return accelerator, threads


def data_layout(t: RunConfig, accelerator: Accelerator, seed: int, buckets: list[tuple[int, int]] | None = None) -> dict:
    """The settings that fix the position in the data: a checkpoint resumes only under the same ones
    (the bucket set too: it decides which images form a batch)."""
    layout = {"batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps, "num_processes": accelerator.num_processes, "seed": seed}
    return layout | ({"buckets": [f"{h}x{w}" for h, w in buckets]} if buckets else {})


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


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, samples, checkpoint) runs after ``step``: every ``every`` steps and at the end."""
    return step % every == 0 or step == max_steps
