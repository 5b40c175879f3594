"""What every training job does around its loop, once: the accelerator and thread set-up,
resume-or-start, the run's log and trackers, checkpoints, and the guard (lock, signals,
divergence). A job calls these as ``run.<name>``; its loop stays in its own file."""

from training.run.budget import Horizon, StepBudget
from training.run.checkpoint import save_checkpoint
from training.run.guard import StopGuard, check_finite, guarded
from training.run.optim import build_optimizer, evaluation_weights
from training.run.setup import (
    after_optimizer_step,
    backward_and_step,
    checkpoint_schedule_and_ema,
    due,
    finish,
    resume_or_start,
    start_accelerator,
    write_start,
)
from training.run.tracking import LossWindow, RunLog

__all__ = [
    "Horizon",
    "LossWindow",
    "RunLog",
    "StepBudget",
    "StopGuard",
    "after_optimizer_step",
    "backward_and_step",
    "build_optimizer",
    "check_finite",
    "checkpoint_schedule_and_ema",
    "due",
    "evaluation_weights",
    "finish",
    "guarded",
    "resume_or_start",
    "save_checkpoint",
    "start_accelerator",
    "write_start",
]
