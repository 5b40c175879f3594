import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from autoencoder.discriminator import PatchDiscriminator
from autoencoder.losses import AutoencoderLoss, LossConfig, adaptive_gan_weight, hinge_d_loss
from autoencoder.perceptual import LPIPS


def test_hinge_discriminator_loss_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(expected))
    # a perfect, confident discriminator has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) == 0


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    torch.manual_seed(0)
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(8, 4)
    out = x @ w
    rec = (out**2).sum()
    g = -(out.sin()).mean()
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = gr.norm() / (gg.norm() + 1e-4)
    assert torch.isclose(adaptive_gan_weight(rec, g, w), expected)
    assert adaptive_gan_weight(rec, g, w, max_weight=1e-3) == 1e-3  # clamped
    assert not adaptive_gan_weight(rec, g, w).requires_grad


def _posterior(mean, logvar):
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_plain_vae_loss_is_squared_error_plus_kl():
    """The MSE + KL baseline of benchmarks/autoencoder_recipe.py: no L1, no LPIPS, no GAN."""
    cfg = LossConfig(l1_weight=0.0, mse_weight=1.0, perceptual_weight=0.0, kl_weight=1e-3, disc_weight=0.0)
    loss_fn = AutoencoderLoss(LPIPS(), cfg)
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2) * 0.1
    loss, logs = loss_fn.generator_loss(x, x_hat, _posterior(mean, logvar), step=100, discriminator=PatchDiscriminator(num_layers=1))
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 2
    assert torch.isclose(loss, ((x - x_hat) ** 2).sum() / 2 + 1e-3 * kl, rtol=1e-5)
    assert "g_loss" not in logs and logs["lpips"] == 0


def test_generator_loss_terms_and_gan_switch():
    torch.manual_seed(0)
    lpips = LPIPS()  # weights do not matter for the bookkeeping checked here
    cfg = LossConfig(l1_weight=1.0, perceptual_weight=0.5, kl_weight=1e-2, disc_start=10, disc_weight=0.7)
    loss_fn = AutoencoderLoss(lpips, cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4) * 0.1
    post = _posterior(mean, logvar)
    loss, logs = loss_fn.generator_loss(x, x_hat, post, step=9, discriminator=PatchDiscriminator(num_layers=1))
    # closed forms: L1 summed per image, LPIPS broadcast over pixels, KL of N(mu, sigma^2) vs N(0, 1)
    p = lpips(x, x_hat).detach()
    rec = ((x - x_hat).abs().sum() + 0.5 * p.sum() * 3 * 16 * 16) / 2
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 2
    assert torch.isclose(loss, rec + 1e-2 * kl, rtol=1e-5)
    assert "g_loss" not in logs  # before disc_start: no GAN term
    torch.manual_seed(1)
    disc = PatchDiscriminator(num_layers=1)
    loss_gan, logs = loss_fn.generator_loss(x, x_hat, post, step=10, last_layer=x_hat, discriminator=disc)
    g = -disc(x_hat).mean()
    rec_with_grad = ((x - x_hat).abs().sum() + 0.5 * lpips(x, x_hat).sum() * 3 * 16 * 16) / 2
    lam = adaptive_gan_weight(rec_with_grad, g, x_hat)  # measured here at x_hat itself
    assert torch.isclose(torch.tensor(logs["g_loss"]), g.detach(), rtol=1e-5)
    assert torch.isclose(torch.tensor(logs["adaptive_weight"]), lam, rtol=1e-4)
    assert torch.isclose(loss_gan, rec + 1e-2 * kl + 0.7 * lam * g, rtol=1e-4)


def test_patch_discriminator_scores_patches():
    d = PatchDiscriminator(channels=8, num_layers=2)
    out = d(torch.randn(3, 3, 32, 32))
    assert out.shape[0] == 3 and out.shape[1] == 1 and out.shape[2] > 1  # a map of patch logits
    d_loss, logs = AutoencoderLoss(LPIPS(), LossConfig()).discriminator_loss(d, torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    d_loss.backward()
    assert all(p.grad is not None for p in d.parameters())


def test_perceptual_term_switches_on_at_perceptual_start():
    """Before loss.perceptual_start the loss is L1 + KL only (LPIPS not even computed); from it on, LPIPS joins."""
    torch.manual_seed(0)
    lpips = LPIPS()
    cfg = LossConfig(l1_weight=1.0, perceptual_weight=0.5, kl_weight=0.0, perceptual_start=5, disc_weight=0.0)
    loss_fn = AutoencoderLoss(lpips, cfg)
    x, x_hat = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    post = _posterior(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    l1 = (x - x_hat).abs().sum() / 2
    before, logs = loss_fn.generator_loss(x, x_hat, post, step=4)
    assert torch.isclose(before, l1) and logs["lpips"] == 0
    after, logs = loss_fn.generator_loss(x, x_hat, post, step=5)
    p = lpips(x, x_hat)
    assert torch.isclose(after, l1 + 0.5 * p.sum() * 3 * 16 * 16 / 2, rtol=1e-5) and logs["lpips"] == pytest.approx(p.mean().item())
