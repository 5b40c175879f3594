"""A stage-2 micro-batch, noised: the cached rows a batch names, a fresh latent drawn from each posterior, the noise
level and the noise of the step's randomness, the noisy input and the objective's target, the caption conditioning and
the loss mask. The training step and DreamBooth's class images (``training/stage2/prior.py``) make theirs here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoencoder import normalize_latents, sample_latents
from training.stage2.randomness import step_randomness


@dataclass
class MicroBatch:
    x_t: torch.Tensor  # (B, C, h, w) the noisy latents
    t: torch.Tensor  # (B,) the U-Net's timesteps
    cond: dict  # UNetAndTextEncoder's text keyword arguments
    target: torch.Tensor  # (B, C, h, w)
    level: torch.Tensor  # (B,) DDPM's t or flow's sigma (the loss weighting's)
    mask: torch.Tensor | None  # (B, 1, h, w) data.mask's weights, or None


class NoisyBatches:
    """The micro-batches of one batch stream over one latent cache, each from (seed, micro-batch number) alone."""

    def __init__(self, cache, stream, conditioning, objective, vae, cfg, levels: dict | None, device, seed: int):
        self.cache, self.stream, self.conditioning, self.objective, self.vae = cache, stream, conditioning, objective, vae
        self.cfg, self.levels, self.device, self.seed = cfg, levels, device, seed

    def start(self, micro: int) -> NoisyBatches:
        """From micro-batch ``micro`` on (a resumed run's position)."""
        self.picks = iter(self.stream.sampler(micro))
        return self

    def next(self, micro: int, rank: int, world: int) -> MicroBatch:
        """Micro-batch number ``micro`` (this process's share of it)."""
        picks = next(self.picks)
        idx, flip = torch.tensor([i for i, _ in picks]), torch.tensor([f for _, f in picks])
        moments = self.cache.posteriors(idx, flip)  # (B, 2C, h, w): h, w of the batch's bucket
        latent_shape = (moments.shape[1] // 2, *moments.shape[2:])  # (C, h, w)
        draws = step_randomness(self.seed, micro, self.stream.global_batch, latent_shape, rank, world, self.levels)
        # x_0: a fresh draw from each posterior, normalised to unit variance by the autoencoder's scaling/shift factor
        x0 = normalize_latents(self.vae, sample_latents(moments, draws["latent_noise"])).to(self.device)
        level = draws[self.objective.draw].to(self.device)  # DDPM: the timestep t; flow: sigma, at timestep 1000 sigma
        x_t, target = self.objective.noisy_input_and_target(x0, draws["eps"].to(self.device), level, draws["offset"])
        # each sample one of its image's captions, its tags shuffled / dropped (captions.*); dropped captions become ""
        dropped = draws["drop"] < self.cfg.objective.caption_dropout
        cond = self.conditioning(idx, dropped, self.device, draws["caption_seed"])
        time_ids = self.cache.size_conditions(idx, flip)  # Stable Diffusion XL's size and crop conditioning (B, 6), or None
        if time_ids is not None:
            cond["time_ids"] = time_ids.to(self.device)
        mask = self.cache.loss_masks(idx, flip)  # data.mask's weights (B, 1, h, w), or None
        mask = mask.to(self.device) if mask is not None else None
        return MicroBatch(x_t, self.objective.timestep(level), cond, target, level, mask)
