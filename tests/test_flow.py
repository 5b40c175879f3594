"""The flow-matching objective's formulas (ldm/flow.py) against closed forms and diffusers' flow scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ldm.flow import add_flow_noise, flow_loss_weights, flow_target, sample_sigmas, shift_sigmas, timesteps_of


def test_the_path_runs_from_the_data_to_the_noise_and_its_velocity_is_the_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(add_flow_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(add_flow_noise(x0, eps, torch.ones(3)), eps)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    mid = add_flow_noise(x0, eps, sigma)
    assert torch.allclose(mid[1], (x0[1] + eps[1]) / 2) and torch.allclose(mid[0], 0.9 * x0[0] + 0.1 * eps[0])
    h = 1e-3  # the path is straight: its finite difference is the velocity at every sigma
    slope = (add_flow_noise(x0.double(), eps.double(), sigma.double() + h) - add_flow_noise(x0.double(), eps.double(), sigma.double())) / h
    assert torch.allclose(slope, flow_target(x0, eps).double(), atol=1e-9)


def test_the_shift_is_the_one_diffusers_flow_scheduler_applies_to_its_sigmas():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigmas(u, 1.0), u)
    shifted = shift_sigmas(u, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and shifted[5] == pytest.approx(0.75) and (shifted >= u).all()
    plain, moved = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s) for s in (1.0, 3.0))
    assert torch.allclose(moved.sigmas.double(), shift_sigmas(plain.sigmas.double(), 3.0), atol=1e-6)  # its 1,000 training levels
    assert torch.allclose(moved.timesteps.double(), timesteps_of(moved.sigmas.double()), atol=1e-3)  # timestep = 1000 sigma
    moved.set_timesteps(10)  # and at generation
    assert torch.allclose(moved.timesteps.double(), timesteps_of(moved.sigmas[:-1].double()), atol=1e-3)


def _histogram(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return torch.tensor([((x >= a) & (x < b)).double().mean().item() for a, b in zip(edges[:-1], edges[1:])])


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _mode_u(w: torch.Tensor, c: float) -> torch.Tensor:
    return 1 - w - c * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)


def _invert_decreasing(f, y: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = f(mid) > y  # f decreasing: the root is to the right
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sampled_noise_levels_have_the_documented_density(sampling, shift):
    """200,000 draws, their mass in 10 bins of sigma against the closed-form CDF (each bin within 0.005,
    ~5 standard errors), through the shift's inverse u = sigma / (shift - (shift - 1) sigma)."""
    m, s, c = 0.3, 0.8, 1.29
    sigma = sample_sigmas(200_000, torch.Generator().manual_seed(1), sampling, logit_mean=m, logit_std=s, mode_scale=c, shift=shift).double()
    assert 0 < sigma.min() and sigma.max() < 1
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    u = edges / (shift - (shift - 1) * edges)  # the bins' edges before the shift
    if sampling == "uniform":
        cdf = u
    elif sampling == "logit_normal":
        cdf = _normal_cdf((torch.logit(u.clamp(1e-12, 1 - 1e-12)) - m) / s)
    else:  # u = f(w), f decreasing for this c: P(u <= x) = 1 - f^-1(x)
        cdf = 1 - _invert_decreasing(lambda w: _mode_u(w, c), u)
    cdf[0], cdf[-1] = 0.0, 1.0
    expected = cdf[1:] - cdf[:-1]
    assert (_histogram(sigma, edges) - expected).abs().max() < 0.005, (_histogram(sigma, edges), expected)
    if sampling == "logit_normal" and shift == 1.0:
        logit = torch.logit(sigma)
        assert logit.mean() == pytest.approx(m, abs=0.01) and logit.std() == pytest.approx(s, abs=0.01)


def test_the_loss_weights_are_sd3s_closed_forms_and_unknown_names_are_refused():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(flow_loss_weights(sigma, "none"), torch.ones(3))
    assert torch.allclose(flow_loss_weights(sigma, "sigma_sqrt"), sigma**-2)
    assert torch.allclose(flow_loss_weights(sigma, "cosmap"), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    with pytest.raises(ValueError, match="valid: none, sigma_sqrt, cosmap"):
        flow_loss_weights(sigma, "snr")
    with pytest.raises(ValueError, match="valid: uniform, logit_normal, mode"):
        sample_sigmas(4, torch.Generator(), "cosine")


def test_diffusers_flow_euler_with_the_exact_velocity_lands_on_one_point_data():
    """On data that is one point x_0, the exact velocity at x is (x - x_0) / sigma (= eps - x_0 on the path):
    Euler steps from pure noise end on x_0, with the U-Net's timestep = 1000 sigma at every step."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(8)
    x = torch.randn(1, 4, 8, 8, generator=g)  # sigma = 1: the noise itself
    for t, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1]):
        assert t.item() == pytest.approx(timesteps_of(sigma).item(), abs=1e-3)
        eps = x0 + (x - x0) / sigma  # the noise on the straight path through x
        x = scheduler.step(flow_target(x0, eps), t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-5)


def _velocity_oracle(pipe, x0: torch.Tensor, seen: list) -> None:
    """The U-Net replaced by the exact velocity of one-point data x0 at its input: (x - x0) / sigma, sigma = t / 1000."""

    def forward(sample, t, **_):
        seen.append((sample.clone(), float(t)))
        return ((sample - x0) / (float(t) / 1000),)

    pipe.unet.forward = forward


@pytest.mark.parametrize("name, tolerance", [("euler", 1e-4), ("heun", 1e-4), ("dpm++", 2e-2), ("unipc", 2e-2)])
def test_the_pipeline_generates_on_a_flow_model_with_each_flow_sampler(name, tolerance):
    """From pure noise, with guidance, each sampler ends on the data; DPM++ and UniPC round their timesteps to
    integers, so the oracle's sigma (t / 1000) is off by up to 1/1000 at each step there."""
    from tests.conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe.set_scheduler(name)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = []
    _velocity_oracle(pipe, x0, seen)
    out = pipe(["a"], num_inference_steps=6, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert len(seen) >= 6 and (out - x0).abs().max() < tolerance, (out - x0).abs().max()


def test_img2img_on_a_flow_model_starts_on_the_straight_path_from_the_images_latent():
    """strength 0.5 of 4 Euler steps: the first U-Net input is (1 - sigma) z + sigma eps at the third
    timestep's sigma, z the image's latent (the posterior mean) and eps the generator's first draw."""
    from diffusers.utils.torch_utils import randn_tensor

    from autoencoder.latents import encode_latents
    from tests.conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # in [0, 1], as users give it
    seen = []
    _velocity_oracle(pipe, torch.zeros(1, 4, 8, 8), seen)
    pipe(["a"], image=image, strength=0.5, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    with torch.no_grad():
        z = encode_latents(pipe.vae, image * 2 - 1)
    eps = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    reference.set_timesteps(4)
    sigma = reference.sigmas[2]
    assert len(seen) == 2 and seen[0][1] == pytest.approx(float(reference.timesteps[2]))
    assert torch.allclose(seen[0][0], add_flow_noise(z, eps, sigma.view(1)), atol=1e-5)


def test_the_web_page_offers_a_flow_models_own_samplers():
    import gradio as gr

    from ldm.app import build_app
    from tests.conftest import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    (dropdown,) = [b for b in build_app(pipe).blocks.values() if isinstance(b, gr.Dropdown)]
    assert [value for _, value in dropdown.choices] == ["euler", "heun", "dpm++", "unipc", "lcm"] and dropdown.value == "dpm++"
