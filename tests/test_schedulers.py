import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from ldm.schedulers import SCHEDULERS, make_scheduler, step_kwargs


@pytest.fixture
def training_schedule():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="v_prediction", timestep_spacing="trailing").config


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_keeps_the_training_schedule_and_steps(name, training_schedule):
    sched = make_scheduler(name, training_schedule)
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_end == 0.012
    assert sched.config.timestep_spacing == "trailing"
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8) * sched.init_noise_sigma
    extra = step_kwargs(sched, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, sched.scale_model_input(x, t), **extra).prev_sample
    assert torch.isfinite(x).all()


def test_step_kwargs_follow_each_samplers_signature(training_schedule):
    g = torch.Generator()
    assert "generator" in step_kwargs(make_scheduler("euler-a", training_schedule), g)
    assert step_kwargs(make_scheduler("heun", training_schedule), g, eta=0.0) == {}
    assert step_kwargs(make_scheduler("ddim", training_schedule), g, eta=0.0) == {"generator": g, "eta": 0.0}


def test_dpmpp_is_the_2m_solver(training_schedule):
    sched = make_scheduler("DPM++", training_schedule)
    assert isinstance(sched, DPMSolverMultistepScheduler)
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2


def test_unknown_name_lists_the_valid_ones(training_schedule):
    with pytest.raises(ValueError, match="unknown scheduler 'plms'.*dpm\\+\\+.*euler-a"):
        make_scheduler("plms", training_schedule)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_perfect_denoiser_recovers_the_data(name):
    """With the true noise as model output, every sampler must land on x0 (DESIGN: analytic checks)."""
    config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012, prediction_type="epsilon").config
    sched = make_scheduler(name, config)
    sched.set_timesteps(8)
    torch.manual_seed(0)
    x0 = torch.rand(1, 4, 8, 8) * 2 - 1
    x = torch.randn_like(x0) * sched.init_noise_sigma
    extra = step_kwargs(sched, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x_t = sched.scale_model_input(x, t)  # the DDPM-space sample the model sees
        abar = sched.alphas_cumprod[int(round(float(t)))]
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        x = sched.step(eps, t, x, **extra).prev_sample
    assert torch.allclose(x, x0, atol=1e-3), (x - x0).abs().max()
