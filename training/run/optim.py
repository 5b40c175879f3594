"""``train.optimizer``: the optimizers fine-tuners bring from kohya's sd-scripts, OneTrainer and SimpleTuner, each from
the library that owns it. Every one keeps its whole state in ``state_dict`` (so in each checkpoint), so a resumed run
is the run that never stopped.

- ``adamw``: torch's AdamW, fused (one kernel over all parameters). The default.
- ``adafactor``: transformers' Adafactor with the LR given (``relative_step=False``, ``scale_parameter=False``: what
  kohya and diffusers' scripts set for Stable Diffusion), factored second moments: less optimizer memory.
- ``prodigy``: prodigyopt's Prodigy, which estimates the LR itself; ``train.lr`` multiplies its estimate, so it is
  1.0 as its authors advise (refused otherwise), and its schedule is the run's as for the others.
- ``schedule_free_adamw``: schedulefree's AdamWScheduleFree, which needs no LR decay (``train.lr_schedule=constant``)
  and warms up itself (``train.lr_warmup_steps``). Its weights for sampling and export are an average the optimizer
  holds: :func:`evaluation_weights` swaps them in and out.
- ``adamw_8bit``: bitsandbytes' AdamW8bit (8-bit optimizer states), where bitsandbytes is installed and runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from training.config import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "prodigy", "schedule_free_adamw", "adamw_8bit")


def check_optimizer(train_cfg) -> None:
    """The rules of ``train.optimizer`` with the rest of ``train:``, before any work."""
    name = train_cfg.optimizer
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer='{name}' is unknown; valid: {', '.join(OPTIMIZERS)}")
    if name == "prodigy" and train_cfg.lr != 1.0:
        raise ConfigError(
            f"train.lr={train_cfg.lr} with train.optimizer=prodigy: Prodigy finds the LR itself and train.lr scales it; set train.lr=1.0"
        )
    if name == "schedule_free_adamw" and train_cfg.lr_schedule != "constant":
        raise ConfigError(
            f"train.lr_schedule={train_cfg.lr_schedule} with train.optimizer=schedule_free_adamw: it needs no schedule "
            "(it warms up over train.lr_warmup_steps itself); set train.lr_schedule=constant"
        )
    if name == "schedule_free_adamw" and (train_cfg.ema_decay is not None or train_cfg.ema.kind == "posthoc"):
        raise ConfigError(
            "train.optimizer=schedule_free_adamw exports an average of the weights already, and an EMA would average its "
            "training point instead: set train.ema_decay=null and train.ema.kind=decay"
        )
    if name == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:
            raise ConfigError(_no_8bit(err)) from None


def build_optimizer(groups: list[dict], train_cfg, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``train.optimizer`` over parameter ``groups`` (each with its ``lr``), with ``train.weight_decay``."""
    name, lr, decay = train_cfg.optimizer, train_cfg.lr, train_cfg.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=decay, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, betas=betas, weight_decay=decay, safeguard_warmup=True, use_bias_correction=True)
    if name == "schedule_free_adamw":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(groups, lr=lr, betas=betas, weight_decay=decay, warmup_steps=train_cfg.lr_warmup_steps)
        optimizer.train()  # the mode its steps take; checkpoints are saved in it too
        return optimizer
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=decay)
        _probe_step(optimizer)
        return optimizer
    except Exception as err:  # no kernel for this device: bitsandbytes says which
        raise ConfigError(_no_8bit(err)) from None


def _no_8bit(err: Exception) -> str:
    said = str(err).splitlines()[0] if str(err) else "no message"
    return (
        f"train.optimizer=adamw_8bit needs bitsandbytes running on this machine ({type(err).__name__}: {said}); "
        "pip install bitsandbytes on a CUDA machine, or use train.optimizer=adafactor for less optimizer memory"
    )


def _probe_step(optimizer) -> None:
    """One step of ``optimizer``'s kind on a throwaway tensor of its first parameter's device: bitsandbytes imports on
    machines where its kernels do not run, and would fail only at the first real step."""
    first = optimizer.param_groups[0]["params"][0]
    probe = torch.zeros(4096, device=first.device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    type(optimizer)([probe], lr=1e-3).step()


def schedule_free(optimizer) -> torch.optim.Optimizer | None:
    """The schedule-free optimizer behind ``optimizer`` (accelerate's wrapper or not), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if type(inner).__name__ == "AdamWScheduleFree" else None


@contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """For sample grids and the export: a schedule-free optimizer's averaged weights in the model (its ``eval()``), and
    afterwards its training point back bit for bit: the copies taken before, not ``train()``, whose interpolation back
    rounds differently (a run that sampled would not be one that did not). Nothing for the other optimizers."""
    inner = schedule_free(optimizer)
    if inner is None:
        yield
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, copy in zip(params, saved):
                p.copy_(copy)
        for group in inner.param_groups:
            group["train_mode"] = True  # the state train() would leave, without its arithmetic
