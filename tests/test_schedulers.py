import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from ldm.schedulers import SCHEDULERS, make_scheduler, step_kwargs


@pytest.fixture
def training_schedule():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="v_prediction", timestep_spacing="trailing",
                         clip_sample=False).config  # fmt: skip  (as the schedule of every exported folder)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_keeps_the_training_schedule_and_lands_on_the_data_with_the_exact_denoiser(name, training_schedule):
    """Data that is one point x0: the exact v-prediction at (x_t, t) is sqrt(abar) eps - sqrt(1 - abar) x0 with
    eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar). Every sampler, deterministic or ancestral, must end on x0."""
    sched = make_scheduler(name, training_schedule)
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_end == 0.012
    assert sched.config.timestep_spacing == "trailing"
    table = DDPMScheduler.from_config(training_schedule).alphas_cumprod.double()

    def abar(t) -> torch.Tensor:  # sigma-based samplers give timesteps between the integers
        lo = int(float(t))
        w = float(t) - lo
        return (1 - w) * table[lo] + w * table[min(lo + 1, len(table) - 1)]

    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sched.init_noise_sigma
    extra = step_kwargs(sched, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x_t, a = sched.scale_model_input(x, t), abar(t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        x = sched.step(a.sqrt() * eps - (1 - a).sqrt() * x0, t, x, **extra).prev_sample
    assert (x - x0).abs().max() < 1e-5


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


@pytest.fixture
def flow_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config  # a flow model's scheduler/


@pytest.mark.parametrize("name", ["euler", "heun", "dpm++", "unipc"])
def test_every_flow_sampler_keeps_the_shift_and_lands_on_the_data_with_the_exact_velocity(name, flow_schedule):
    """Data that is one point x0: at x with noise level sigma the exact velocity is eps - x0 = (x - x0) / sigma
    (x = (1 - sigma) x0 + sigma eps). Each sampler's own sigma at each step, and its timestep is 1000 sigma
    (to the integer, for the solvers that round it), as the U-Net was trained."""
    from ldm.schedulers import FLOW_SCHEDULERS, flow_shift, is_flow

    sched = make_scheduler(name, flow_schedule)
    assert isinstance(sched, FLOW_SCHEDULERS[name][0]) and is_flow(sched.config) and flow_shift(sched.config) == 3.0
    assert flow_shift(make_scheduler("euler", sched.config).config) == 3.0  # and back again
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in sched.timesteps:
        sigma = sched.sigmas[sched.step_index if sched.step_index is not None else 0].double()
        assert abs(float(t) - 1000 * float(sigma)) <= 1.0, (t, sigma)
        x = sched.step((x - x0) / sigma, t, x).prev_sample
    assert (x - x0).abs().max() < 1e-5


def test_a_flow_model_refuses_the_samplers_it_has_not_in_one_line(flow_schedule):
    with pytest.raises(ValueError, match="'ddim' does not sample a flow-matching model; valid for it: euler, heun, dpm\\+\\+, unipc"):
        make_scheduler("ddim", flow_schedule)
