"""Every random draw of one stage-2 micro-batch (training and distillation share it)."""

from __future__ import annotations

from typing import Callable

import torch


def step_randomness(
    seed: int,
    micro_batch: int,
    global_batch: int,
    latent_shape: tuple,
    rank: int,
    world: int,
    extra: dict[str, Callable[[int, torch.Generator], torch.Tensor]] | None = None,
) -> dict:
    """Every random draw of one micro-batch, made for the whole global batch from (seed, micro-batch)
    and sliced like the data ([rank::world]): a sample gets the same noise whatever the number of
    processes, and a resumed run the same as an uninterrupted one. ``extra``: name -> ``draw(n, generator)``,
    a job's own draws (a flow objective's noise levels, a distillation's grid steps and guidance scales), made
    after the common ones and in order, so the draws before them are what they always were; then each sample's
    caption seed (``training/data/captions.py``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * micro_batch + 1)
    draws = {
        "latent_noise": torch.randn(global_batch, *latent_shape, generator=g),  # posterior sample
        "eps": torch.randn(global_batch, *latent_shape, generator=g),  # diffusion noise
        "offset": torch.randn(global_batch, latent_shape[0], generator=g),
        "t": torch.randint(0, 1000, (global_batch,), generator=g),
        "drop": torch.rand(global_batch, generator=g),
    }
    for name, draw in (extra or {}).items():
        draws[name] = draw(global_batch, g)
    draws["caption_seed"] = torch.randint(0, 2**62, (global_batch,), generator=g)  # each sample's caption draw (last:
    # the draws above are what they were before captions were drawn)
    return {k: v[rank::world] for k, v in draws.items()}
