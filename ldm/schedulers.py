"""Samplers by name: every one is a diffusers scheduler built from the model's own scheduler config.

    make_scheduler("dpm++", pipe.scheduler.config)

The training noise schedule (betas, prediction type, timestep spacing) lives in that config and
is carried over; only the sampling algorithm changes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from runtime.errors import InputError

# name -> (class, settings that define the algorithm on top of the model's schedule)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),  # DPM++ 2M
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """The sampler ``name`` on the noise schedule described by ``config`` (a scheduler's config)."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    cls, settings = SCHEDULERS[key]
    return cls.from_config(config, **settings)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None = None, eta: float | None = None) -> dict:
    """The optional keyword arguments that this scheduler's ``step`` accepts: only the stochastic
    samplers take a ``generator``, only DDIM/DDPM-like ones an ``eta``."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if generator is not None and "generator" in params:
        kwargs["generator"] = generator
    if eta is not None and "eta" in params:
        kwargs["eta"] = eta
    return kwargs
