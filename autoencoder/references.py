"""Simple codes of a given size that a trained autoencoder is read against.

An autoencoder whose latent holds ``n`` numbers per image should beat, on images it never saw:
- :func:`bicubic_code`: area-downsample to ``k x k x 3 <= n`` values and bicubic back up
  (nothing learned: it keeps every image's colours and coarse shapes, whatever their kind);
- :class:`PCACode`: the best *linear* code with ``n`` components, fitted on the training images.
Both take and return (B, 3, H, W) images in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_PCA_DIM = 3 * 64 * 64  # above this (images over 64x64) the PCA reference is skipped: its fit grows as D^2


def pca_fits(resolution: int, channels: int = 3) -> bool:
    """Whether the PCA reference is computed for images of this size (up to 64x64 RGB)."""
    return channels * resolution * resolution <= MAX_PCA_DIM


def bicubic_side(num_values: int, channels: int = 3) -> int:
    """The largest ``k`` with ``k * k * channels <= num_values``."""
    k = math.isqrt(num_values // channels)
    if k < 1:
        raise ValueError(f"{num_values} values cannot hold one pixel of {channels} channels")
    return k


def bicubic_code(x: torch.Tensor, num_values: int) -> torch.Tensor:
    """(B, 3, H, W) -> area-downsampled to k x k (k * k * 3 <= num_values) -> bicubic to H x W."""
    k = bicubic_side(num_values, x.shape[1])
    small = F.interpolate(x.float(), size=(k, k), mode="area")  # (B, 3, k, k)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


class PCACode:
    """Project onto the top ``n`` principal components of the training images and back."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        self.mean = mean  # (D,)
        self.components = components  # (n, D), orthonormal rows

    @classmethod
    def fit(cls, images: torch.Tensor, num_components: int) -> PCACode:
        """``images``: (N, 3, H, W). Exact SVD of the centred data; at most min(N, D) components."""
        X = images.flatten(1).double()  # (N, D)
        if X.shape[1] > MAX_PCA_DIM:
            raise ValueError(f"PCA reference: {X.shape[1]} values per image is over {MAX_PCA_DIM} (64x64 RGB)")
        mean = X.mean(0)
        _, _, Vh = torch.linalg.svd((X - mean).float(), full_matrices=False)  # (min(N, D), D)
        return cls(mean, Vh[:num_components].double())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).double() - self.mean  # (B, D)
        coded = flat @ self.components.T  # (B, n): the code
        return (coded @ self.components + self.mean).float().view_as(x).clamp(-1, 1)
