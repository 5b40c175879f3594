"""``train.max_minutes``: a run that ends in a time budget instead of a step count.

The job measures its own step time over its first steps (after a few warm-up steps, for at least
``probe_seconds(budget)`` and ``PROBE_STEPS`` steps), then fixes

    max_steps = min(train.max_steps, probe end + floor(budget left / seconds per step))

and the LR schedule's horizon with it: the steps before follow the schedule over ``train.max_steps``,
those after it the schedule over the fixed ``max_steps`` (the same function of the step for
constant schedules, and, in a warm-up longer than the probe, for every diffusers schedule). A
phase whose step costs more (stage 1's discriminator, from ``loss.disc_start``) is measured again
when it starts, and ``max_steps`` fixed again from it. Each fixed value is written to log.jsonl
(``event: budget``) and into every checkpoint, so a resumed run keeps it and stays exact; a run
stopped before a value was fixed measures again after its restart, with the budget it has left.

The budget counts the training loop (steps, logs, sample grids, checkpoints), not the latent cache
or the evaluation after the last step. Every process fixes the same value (the slowest one's
step time decides).
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import broadcast
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_wsd_schedule

WARMUP_STEPS = 5  # not timed: allocations, kernel choices
PROBE_STEPS = 10


def probe_seconds(budget_s: float) -> float:
    """How long the step time is measured for: 3% of the budget, at least 10 s."""
    return max(10.0, 0.03 * budget_s)


WSD = "warmup_stable_decay"  # beside diffusers' schedule names: transformers' get_wsd_schedule


class Horizon:
    """The LR schedule's length as something that can change once the budget is known. The schedule is
    diffusers' ``get_scheduler(name, ...)`` as a function of the step, for the current ``total``; ``lr_init``:
    the optimizer's default LR (diffusers' polynomial schedule decays relative to it).

    ``warmup_stable_decay`` (transformers' ``get_wsd_schedule``): linear warm-up, the full LR, then a
    1-sqrt decay to 0 over the last ``decay_fraction`` of the steps (Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"). With a time budget the decay lands at the
    end of whatever the budget allows, while the mean LR stays near the peak (cosine's is half of it)."""

    def __init__(self, name: str, warmup: int, total: int, lr_init: float, decay_fraction: float = 0.2) -> None:
        self.name, self.warmup, self.lr_init, self.decay_fraction = name, warmup, lr_init, decay_fraction
        self.set(total)

    @classmethod
    def of(cls, train_cfg, lr_init: float) -> Horizon:
        """The horizon of a job's ``train:`` settings (``train.max_steps`` until a time budget fixes it)."""
        return cls(train_cfg.lr_schedule, train_cfg.lr_warmup_steps, train_cfg.max_steps, lr_init, train_cfg.lr_decay_fraction)

    def set(self, total: int) -> None:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.lr_init)
        self.total = total
        if self.name == WSD:
            decay = max(0, min(round(self.decay_fraction * total), total - self.warmup))
            made = get_wsd_schedule(probe, self.warmup, decay, num_training_steps=total, decay_type="1-sqrt")
        else:
            made = get_scheduler(self.name, probe, num_warmup_steps=self.warmup, num_training_steps=total)
        self.factor = made.lr_lambdas[0]

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """A scheduler over ``optimizer`` that always follows the current horizon (its state is the step count)."""
        return LambdaLR(optimizer, lambda step: self.factor(step))


class StepBudget:
    """``train.max_minutes`` for one run (None: off, and ``max_steps`` is ``train.max_steps``).
    ``state``: the trainer state resumed from (or a fresh one); ``phase_starts``: steps at which the
    step time changes (measured again there; None: none). ``scheduler`` follows ``horizon``."""

    def __init__(self, train_cfg, horizon: Horizon, state: dict, accelerator, optimizer, scheduler, phase_starts=()) -> None:
        self.minutes, self.cap, self.horizon = train_cfg.max_minutes, train_cfg.max_steps, horizon
        self.accelerator, self.optimizer, self.scheduler = accelerator, optimizer, scheduler
        cap = self.cap
        self.max_steps = state.get("budget_max_steps", cap) if self.minutes is not None else cap
        self.used_s = state.get("budget_seconds", 0.0)  # loop time of the earlier launches of this run
        self.measured = set(state.get("budget_phases", []))  # the phases whose step time fixed max_steps
        self.phases = sorted({0, *(p for p in phase_starts if p is not None)})
        self.launch = time.perf_counter()
        self.probe: tuple[int, float] | None = None  # (step, time) where this probe's timing began
        if self.max_steps != cap:
            horizon.set(self.max_steps)

    def seconds(self) -> float:
        """The run's loop time so far, over every launch."""
        return self.used_s + time.perf_counter() - self.launch

    def state(self) -> dict:
        """What a checkpoint keeps of the budget."""
        if self.minutes is None:
            return {}
        return {
            "budget_max_steps": self.max_steps,
            "budget_seconds": round(self.seconds(), 3),
            "budget_phases": sorted(self.measured),
        }

    def after_step(self, step: int, log, bar) -> None:
        """Called by every process after each optimizer step (``step`` done): times the probe and, when it
        ends, fixes ``max_steps`` and the LR horizon (the next step's LR set from it). Whether the probe
        ends is the main process's call, so that every process ends it at the same step."""
        if self.minutes is None:
            return
        phase = max(p for p in self.phases if p < step)  # the phase the step belongs to
        if phase in self.measured or phase >= self.max_steps:
            return
        if self.probe is None or self.probe[0] < phase:
            if step - phase >= WARMUP_STEPS:  # timing starts after the phase's warm-up steps
                self.probe = (step, time.perf_counter())
            return
        first, began = self.probe
        spent = time.perf_counter() - began
        accelerator = self.accelerator
        ends = torch.tensor([float(step - first >= PROBE_STEPS and spent >= probe_seconds(60 * self.minutes))])
        if not broadcast(ends.to(accelerator.device), from_process=0).item():
            return
        per_step = torch.tensor([spent / (step - first)], device=accelerator.device)
        per_step = accelerator.gather(per_step).max().item()  # every process: the slowest's
        left = 60 * self.minutes - self.seconds()
        self.max_steps = min(self.cap, step + max(0, math.floor(left / per_step)))
        self.measured.add(phase)
        self.horizon.set(self.max_steps)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):  # the next step's LR, new horizon
            group["lr"] = base * self.horizon.factor(self.scheduler.last_epoch)
        bar.total = self.max_steps
        bar.refresh()
        log.write(
            step=step,
            event="budget",
            max_minutes=self.minutes,
            seconds_per_step=round(per_step, 4),
            seconds_so_far=round(self.seconds(), 1),
            max_steps=self.max_steps,
            phase_start=phase,
        )
