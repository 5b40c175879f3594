"""Validation loss during stage 2 (``eval.every``): the training objective on held-out images (``data.eval_split``) at
fixed noise levels, with fixed noise and one fixed posterior draw, so that the curve moves with the model and not with
the draw; and the weights where it was lowest (``eval.keep_best``), kept in ``output_dir/best/`` and exported there.

    val_loss = mean over the K levels and the N images of objective.per_sample_loss(U-Net(x_level, t_level, caption), target)

The levels are DDPM timesteps 100, 300, 500, 700, 900 or flow sigmas 0.1, 0.3, 0.5, 0.7, 0.9 (spread over the whole
path: a loss at one level says little of the others); each image's caption is its first, never dropped; no offset
noise. The U-Net is scored with the weights a grid or the export would use (the EMA's, a schedule-free average).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autoencoder import normalize_latents, sample_latents
from autoencoder.latents import encode_moments
from ldm.sdxl import added_cond
from ldm.text import encode_text, uses_attention_mask
from runtime.files import write_json_atomic
from training.data.captions import first_caption
from training.data.loader import eval_loader, spread_indices
from training.data.records import DataError, has_split, load_records

LEVELS = {"t": [100, 300, 500, 700, 900], "sigma": [0.1, 0.3, 0.5, 0.7, 0.9]}  # by the objective's draw
SEED = 20_240_601  # the held-out noise: one draw for the whole run, whatever its seed
BATCH = 64


class ValidationLoss:
    """The held-out set, encoded once when the run starts (on the main process), and its loss for the weights now."""

    @torch.no_grad()
    def __init__(self, cfg, vae, objective, device) -> None:
        data = replace(cfg.data, random_flip=False, mask=None)  # the held-out images need no loss mask
        records = load_records(cfg.data.path, data, split=cfg.data.eval_split, captions=True)
        records = records.select(spread_indices(len(records), min(len(records), cfg.eval.val_images)))
        moments, self.captions, time_ids = [], [], []
        for batch in eval_loader(records, data, BATCH):  # square crops at data.resolution
            if batch["index"]:
                moments.append(encode_moments(vae, batch["pixel_values"].to(vae.device, vae.dtype)).float().cpu())
                self.captions += [first_caption(text) for text in batch["text"]]
                time_ids.append(batch["time_ids"].float())  # Stable Diffusion XL's size and crop conditioning
        moments, self.time_ids = torch.cat(moments), torch.cat(time_ids)  # (N, 2C, h, w), (N, 6)
        g = torch.Generator().manual_seed(SEED)
        self.x0 = normalize_latents(
            vae, sample_latents(moments, torch.randn(moments[:, : moments.shape[1] // 2].shape, generator=g))
        )
        self.levels = torch.tensor(LEVELS[objective.draw])  # (K,)
        self.eps = torch.randn(len(self.levels), *self.x0.shape, generator=g)  # (K, N, C, h, w)
        self.objective, self.device = objective, device

    def __len__(self) -> int:
        return len(self.x0)

    @torch.no_grad()
    def __call__(self, unet, tokenizer, text_encoder) -> float:
        """The mean loss of the U-Net (in eval mode for the call) on every held-out image at every level."""
        was_training = (unet.training, text_encoder.training)
        unet.eval(), text_encoder.eval()
        masked = uses_attention_mask(text_encoder)
        total = torch.zeros((), dtype=torch.float64)
        try:
            for start in range(0, len(self), BATCH):
                emb = encode_text(tokenizer, text_encoder, self.captions[start : start + BATCH])
                mask = emb.mask.to(self.device) if masked else None
                x0 = self.x0[start : start + BATCH].to(self.device)
                time_ids = self.time_ids[start : start + BATCH]  # SDXL: with the pooled embedding, its added conditioning
                added = added_cond(emb.pooled.to(self.device), time_ids) if emb.pooled is not None else None
                for k, level in enumerate(self.levels):
                    level = level.expand(len(x0)).to(self.device)
                    eps = self.eps[k, start : start + BATCH].to(self.device)
                    no_offset = torch.zeros(len(x0), x0.shape[1], device=self.device)
                    x_t, target = self.objective.noisy_input_and_target(x0, eps, level, no_offset)
                    t = self.objective.timestep(level)
                    pred = unet(x_t, t, encoder_hidden_states=emb.states.to(self.device), encoder_attention_mask=mask,
                                added_cond_kwargs=added).sample  # fmt: skip
                    total += self.objective.per_sample_loss(pred, target, level).double().sum().cpu()
        finally:
            unet.train(was_training[0]), text_encoder.train(was_training[1])
        return round(float(total / (len(self) * len(self.levels))), 6)


class Validation:
    """What ``eval.every`` and ``eval.keep_best`` do in a run, on the main process: the loss, logged as ``val_loss``
    (with ``best: true`` where the weights were kept), and the kept weights."""

    def __init__(self, cfg, vae, objective, device, out: Path, named: dict[str, torch.nn.Parameter]) -> None:
        self.every = cfg.eval.every
        self.loss = ValidationLoss(cfg, vae, objective, device)
        self.best = BestWeights(out, named) if cfg.eval.keep_best else None

    def score(self, step: int, log, unet, tokenizer, text_encoder) -> float:
        """The loss of the weights in the U-Net now (the caller swaps in those a grid would use), kept if the lowest."""
        val_loss = self.loss(unet, tokenizer, text_encoder)
        kept = self.best is not None and self.best.offer(step, val_loss)
        log.write(step=step, val_loss=val_loss, **({"best": True} if kept else {}))
        return val_loss


def check_split(cfg) -> None:
    """eval.every on a dataset without its held-out split: one line before any work."""
    if cfg.eval.every and not has_split(cfg.data.path, cfg.data.eval_split):
        raise DataError(
            f"eval.every={cfg.eval.every}: '{cfg.data.path}' has no '{cfg.data.eval_split}' split (data.eval_split) to score"
        )


class BestWeights:
    """``output_dir/best/``: ``weights.safetensors`` (the trained parameters, by name: every U-Net weight, or the LoRA
    adapters; a trained text encoder's too) at the lowest validation loss so far, and ``best.json`` (its step and loss),
    each written under a temporary name and renamed. A resumed run reads them back: the steps it repeats score what
    they scored before, so it keeps what the run that never stopped kept."""

    def __init__(self, out: Path, named: dict[str, torch.nn.Parameter]) -> None:
        self.folder, self.named = Path(out) / "best", named
        record = self.folder / "best.json"
        self.record = json.loads(record.read_text()) if record.is_file() else None

    def offer(self, step: int, val_loss: float) -> bool:
        """Keep the weights now if ``val_loss`` is the lowest yet (ties keep the earlier); whether they were kept."""
        if self.record is not None and val_loss >= self.record["val_loss"] and step != self.record["step"]:
            return False  # (the step it was kept at, scored again after a resume, is kept again: the log marks it)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".weights.safetensors.tmp"
        save_file({name: p.detach().float().cpu().contiguous() for name, p in self.named.items()}, str(tmp))
        os.replace(tmp, self.folder / "weights.safetensors")
        self.record = {"step": step, "val_loss": val_loss}
        write_json_atomic(self.folder / "best.json", self.record)
        return True

    @torch.no_grad()
    def load(self) -> None:
        """The kept weights into the trained parameters (for the export)."""
        with safe_open(str(self.folder / "weights.safetensors"), framework="pt") as f:
            for name, p in self.named.items():
                p.copy_(f.get_tensor(name).to(p.device, p.dtype))
