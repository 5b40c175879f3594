"""Samplers by name: every one is a diffusers scheduler built from the model's own scheduler config.

    make_scheduler("dpm++", pipe.scheduler.config)

The training noise schedule (betas, prediction type, timestep spacing) lives in that config and
is carried over; only the sampling algorithm changes. A flow-matching model (its scheduler a
``FlowMatchEulerDiscreteScheduler``, ldm/flow.py) has the same names on its straight path, with its
shift: Euler and Heun (diffusers' flow schedulers), DPM-Solver++ and UniPC with flow sigmas.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
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
    "lcm": (LCMScheduler, {}),  # multistep consistency sampling: for a distilled student (training/distill.py)
}

# a flow-matching model's: name -> (class, settings, the name of the class's shift setting)
FLOW_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any], str]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {}, "shift"),
    "heun": (FlowMatchHeunDiscreteScheduler, {}, "shift"),
    "dpm++": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
        "flow_shift",
    ),  # fmt: skip
    "unipc": (UniPCMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "flow_shift"),
    "lcm": (FlowMatchLCMScheduler, {}, "shift"),  # a distilled flow student's
}


def is_flow(config: Any) -> bool:
    """Whether ``config`` is a flow-matching model's scheduler (its own, or one of FLOW_SCHEDULERS made from it):
    a FlowMatch* class (named when read from a folder; a constructed one has a shift and no betas), or flow sigmas."""
    named = str(config.get("_class_name", "")).startswith("FlowMatch")
    return named or bool(config.get("use_flow_sigmas")) or ("shift" in config and "beta_schedule" not in config)


def flow_shift(config: Any) -> float:
    """The resolution shift of a flow-matching scheduler's ``config``."""
    return float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """The sampler ``name`` on the noise schedule described by ``config`` (a scheduler's config)."""
    key = name.lower()
    if is_flow(config):
        if key not in FLOW_SCHEDULERS:
            raise InputError(
                f"scheduler '{name}' does not sample a flow-matching model; valid for it: {', '.join(FLOW_SCHEDULERS)}"
            )
        cls, settings, shift_name = FLOW_SCHEDULERS[key]
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000), **{shift_name: flow_shift(config)}, **settings)
    if key not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    cls, settings = SCHEDULERS[key]
    if cls is LCMScheduler:  # its default betas are Stable Diffusion's: carry over the model's even where they were defaults
        config = schedule_of(config)
    return cls.from_config(config, **settings)


def schedule_of(config: Any) -> dict:
    """``config`` with every value taken as given: diffusers' ``from_config`` replaces the values a scheduler was built
    with by default (``_use_default_values``) with the new class's defaults, and LCMScheduler's betas differ from DDPM's."""
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


def set_sampling_timesteps(scheduler: SchedulerMixin, steps: int, device=None) -> None:
    """``scheduler.set_timesteps(steps)``, but a flow student's FlowMatchLCMScheduler samples at sigma = 1, (k-1)/k, ...,
    1/k (then its shift), as LCMScheduler spaces its k steps over the schedule (999, 759, 499, 259 for 4): its own
    spacing ends at sigma 0.001, where a consistency step returns its input, so k steps would do the work of k - 1."""
    if isinstance(scheduler, FlowMatchLCMScheduler):
        scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


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


def folder_scheduler(config: Any) -> SchedulerMixin:
    """The scheduler an exported pipeline folder holds for the training schedule ``config``: DPM++ 2M, for a
    flow-matching model on its flow sigmas with its shift. Unlike diffusers' flow Euler (``euler`` here), it has the
    ``init_noise_sigma`` and ``scale_model_input`` that diffusers' StableDiffusionPipeline calls, so that pipeline
    samples the folder as it is (tested: the same image)."""
    return make_scheduler("dpm++", config)


def sampler_names(config: Any) -> list[str]:
    """The samplers a model with the training schedule ``config`` offers (a flow-matching model: its flow ones)."""
    return list(FLOW_SCHEDULERS if is_flow(config) else SCHEDULERS)
