"""Classifier-free guidance (Ho & Salimans 2022): the sampler extrapolates from the unconditional
prediction through the conditional one,

    pred = pred_uncond + w (pred_cond - pred_uncond)      (= pred_uncond.lerp(pred_cond, w), EDM2's form)

w = 1 is the conditional model alone, w > 1 follows the prompt more closely. It lives in the
sampler loop, never inside a model: one U-Net, trained with captions dropped, gives both terms.
"""

from __future__ import annotations

import torch


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """The guided prediction, with the arithmetic of diffusers' pipelines (so a folder gives the same image in both)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)
