"""Latent consistency distillation (LCM, Luo et al. 2023), written as its equations.

A consistency function f(x_t, t) maps every point of one probability-flow ODE trajectory to the
trajectory's start x_0, with the boundary condition f(x, 0) = x. The student learns it from a
frozen teacher by one "skipping" step of an ODE solver: on a grid of N levels (LCM's N = 50),

    x_n       = the data noised to level n                         (the objective's own path)
    x_{n-1}   = solver step of the guided teacher from x_n to level n - 1
                  teacher  = uncond + w (cond - uncond)             (classifier-free guidance at scale w)
    loss      = d( f_student(x_n, n, w),  f_target(x_{n-1}, n - 1, w) )      (target: no gradient)

with d the pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c (or L2). The target network is an EMA of
the student (LCM), or the student itself without gradient (LCM-LoRA). A full student sees the guidance
scale through an embedding of w - 1 added to its timestep embedding (``time_cond_proj_dim``, which
diffusers' pipelines fill with ``get_guidance_scale_embedding(guidance_scale - 1)``), so one student
samples at any scale with no unconditional pass.

The parameterisation of f fixes the boundary condition, and it is the one the sampler uses:

    flow (FlowMatchLCMScheduler):  sigma_n = shift(n / N),   f = x - sigma F(x, 1000 sigma)
        the solver is the flow ODE's Euler step  x_{n-1} = x_n + (sigma_{n-1} - sigma_n) v;
        f(x, 0) = x exactly.
    DDPM (LCMScheduler):          t_n = n T / N - 1,   f = c_skip(t) x + c_out(t) x0_hat(x, t)
        c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5;
        x0_hat from the eps or v prediction; the solver is DDIM
        x_{n-1} = sqrt(abar_{n-1}) x0_hat + sqrt(1 - abar_{n-1}) eps_hat, from t_1 to t = 0.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchLCMScheduler, LCMScheduler, StableDiffusionPipeline

from .flow import shift_sigmas
from .schedulers import schedule_of

GUIDANCE_EMBEDDING_DIM = 256  # time_cond_proj_dim of a full student, as in diffusers' LCM checkpoints
LCM_GRID = 50  # N: the teacher's skipping-step grid (LCMScheduler's original_inference_steps)


def guidance_embedding(guidance_scale: torch.Tensor, dim: int = GUIDANCE_EMBEDDING_DIM) -> torch.Tensor:
    """(B, dim): the embedding of a student's guidance scale, exactly as diffusers' StableDiffusionPipeline computes it
    (of ``guidance_scale - 1``, in fp32), so a student folder gives one image in both pipelines."""
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, guidance_scale.float() - 1, embedding_dim=dim)


def guidance_condition(unet, guidance_scale: float, batch: int, device) -> torch.Tensor | None:
    """A pipeline's ``timestep_cond`` for ``unet``: the embedding of ``guidance_scale`` for a student that has one
    (``time_cond_proj_dim``: the scale goes in, and there is no unconditional pass), None for any other U-Net."""
    dim = unet.config.get("time_cond_proj_dim")
    if dim is None:
        return None
    return guidance_embedding(torch.full((batch,), float(guidance_scale)), dim).to(device, unet.dtype)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


class FlowConsistency:
    """LCM on a rectified-flow teacher: the grid, the teacher's Euler step and the consistency function."""

    def __init__(self, shift: float = 1.0, grid: int = LCM_GRID) -> None:
        # sigma_0 = 0 (the data), ..., sigma_N = 1 (pure noise), shifted as the teacher's sampler shifts them
        self.levels = shift_sigmas(torch.arange(grid + 1, dtype=torch.float64) / grid, shift).float()  # (N + 1,)
        self.shift = shift

    def timestep(self, n: torch.Tensor) -> torch.Tensor:
        """The U-Net's timestep at grid index ``n``: 1000 sigma_n."""
        return self.levels[n] * 1000

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """x_n = (1 - sigma_n) x_0 + sigma_n eps."""
        s = _per_sample(self.levels[n], x0)
        return (1 - s) * x0 + s * eps

    def solver_step(self, x: torch.Tensor, n: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
        """One Euler step of the flow ODE from level n to n - 1: x + (sigma_{n-1} - sigma_n) v."""
        return x + _per_sample(self.levels[n - 1] - self.levels[n], x) * teacher_v.float()

    def consistency(self, x: torch.Tensor, n: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """f(x, sigma_n) = x - sigma_n F: what FlowMatchLCMScheduler takes for x_0."""
        return x - _per_sample(self.levels[n], x) * out.float()

    def scheduler(self) -> FlowMatchLCMScheduler:
        """The sampler of a student on this path (the export's scheduler/)."""
        return FlowMatchLCMScheduler(num_train_timesteps=1000, shift=self.shift)


class DDPMConsistency:
    """LCM on a DDPM teacher (eps or v): LCMScheduler's grid and boundary scalings, the DDIM solver."""

    def __init__(self, scheduler_config, grid: int = LCM_GRID) -> None:
        self.lcm = LCMScheduler.from_config(schedule_of(scheduler_config), original_inference_steps=grid)
        self.alphas_cumprod = self.lcm.alphas_cumprod.float()  # (T,)
        self.prediction_type = self.lcm.config.prediction_type
        step = self.lcm.config.num_train_timesteps // grid
        # t_0 = 0 (the data end, as LCM's solver clamps it), t_n = n T / N - 1 for n = 1..N
        self.levels = torch.cat([torch.zeros(1), torch.arange(1, grid + 1) * step - 1]).long()  # (N + 1,)

    def timestep(self, n: torch.Tensor) -> torch.Tensor:
        return self.levels[n]

    def _abar(self, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.alphas_cumprod[self.levels[n]], like)

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at t = t_n."""
        a = self._abar(n, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def _x0_eps(self, x: torch.Tensor, n: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, out = self._abar(n, x), out.float()
        if self.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        # v = sqrt(abar) eps - sqrt(1 - abar) x_0
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x

    def solver_step(self, x: torch.Tensor, n: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """DDIM from t_n to t_{n-1}: sqrt(abar_{n-1}) x0_hat + sqrt(1 - abar_{n-1}) eps_hat."""
        x0, eps = self._x0_eps(x, n, teacher_out)
        a_prev = self._abar(n - 1, x)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def consistency(self, x: torch.Tensor, n: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """f = c_skip(t) x + c_out(t) x0_hat, with LCMScheduler's own scalings (so f(x, 0) = x)."""
        c_skip, c_out = self.lcm.get_scalings_for_boundary_condition_discrete(self.levels[n].float())
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * self._x0_eps(x, n, out)[0]

    def scheduler(self) -> LCMScheduler:
        """The sampler of a student on this path (the export's scheduler/): LCMScheduler on the teacher's schedule."""
        return self.lcm


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """(B,): the pseudo-Huber distance sqrt((a - b)^2 + c^2) - c averaged over each sample (LCM's), or the L2 one."""
    diff2 = (prediction.float() - target.float()) ** 2
    per_element = torch.sqrt(diff2 + huber_c**2) - huber_c if kind == "huber" else diff2
    return per_element.mean(dim=tuple(range(1, diff2.ndim)))
