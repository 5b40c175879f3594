"""The first-stage training loss of the latent-diffusion paper (Rombach et al. 2022, app. G):

    L_AE = sum_pixels(|x - x_hat| + w_p * LPIPS(x, x_hat)) / B          (reconstruction; LPIPS once step >= perceptual_start)
         + w_kl * KL(q(z|x) || N(0, I))                                   (KL, per image, summed)
         + lambda * w_d * [-D(x_hat)]            once step >= disc_start  (hinge generator)
    lambda = ||grad_L L_rec|| / (||grad_L L_G|| + 1e-4)   at L = the decoder's last layer
    L_D    = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))     (hinge discriminator)

Sums per image follow the reference code (taming-transformers ``LPIPSWithDiscriminator``), so
``kl_weight=1e-6`` means what it means there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import LPIPS


@dataclass(frozen=True)
class LossConfig:
    l1_weight: float = 1.0
    mse_weight: float = 0.0  # squared error, per pixel (the plain-VAE reconstruction term)
    perceptual_weight: float = 1.0
    perceptual_start: int = 0  # optimizer step at which the LPIPS term switches on (before it: L1 only, ~1.7x cheaper steps)
    kl_weight: float = 1e-6
    disc_start: int = 0  # optimizer step at which the GAN terms switch on
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_channels: int = 64
    max_adaptive_weight: float = 1e4


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at ``last_layer``."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Reconstruction + LPIPS + KL + adaptive hinge GAN. ``lpips`` carries gradients to x_hat."""

    def __init__(self, lpips: LPIPS, cfg: LossConfig) -> None:
        super().__init__()
        self.lpips = lpips
        self.cfg = cfg

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    @property
    def gan_start(self) -> int | None:
        """The first optimizer step with the GAN terms (None: none has them)."""
        return self.cfg.disc_start if self.cfg.disc_weight > 0 else None

    def generator_loss(
        self,
        x: torch.Tensor,  # (B, 3, H, W) in [-1, 1]
        x_hat: torch.Tensor,  # (B, 3, H, W)
        posterior,  # diffusers DiagonalGaussianDistribution
        step: int,
        last_layer: torch.Tensor | None = None,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, B = self.cfg, x.shape[0]
        x, x_hat = x.float(), x_hat.float()
        l1 = (x - x_hat).abs()  # (B, 3, H, W)
        rec_map = cfg.l1_weight * l1
        if cfg.mse_weight > 0:
            rec_map = rec_map + cfg.mse_weight * (x - x_hat) ** 2
        p = torch.zeros(B, device=x.device)
        if cfg.perceptual_weight > 0 and step >= cfg.perceptual_start:
            p = self.lpips(x, x_hat).float()  # (B,), differentiable in x_hat
            rec_map = rec_map + cfg.perceptual_weight * p.view(B, 1, 1, 1)
        rec_loss = rec_map.sum() / B
        kl = posterior.kl().float().sum() / B
        loss = rec_loss + cfg.kl_weight * kl
        logs = {"l1": l1.mean().item(), "lpips": p.mean().item(), "kl": kl.item(), "rec_loss": rec_loss.item()}
        if discriminator is not None and self.gan_active(step):
            g_loss = -discriminator(x_hat).float().mean()
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_gan_weight(rec_loss, g_loss, last_layer, cfg.max_adaptive_weight)
            else:
                weight = torch.tensor(0.0, device=x.device)
            loss = loss + cfg.disc_weight * weight * g_loss
            logs.update(g_loss=g_loss.item(), adaptive_weight=weight.item())
        logs["ae_loss"] = loss.item()
        return loss, logs

    def discriminator_loss(
        self, discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits_real = discriminator(x.detach()).float()
        logits_fake = discriminator(x_hat.detach()).float()
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.item(), "logits_real": logits_real.mean().item(), "logits_fake": logits_fake.mean().item()}
