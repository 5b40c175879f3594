"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
section 3 and appendix C): track two power-function EMA profiles during training, keep snapshots of both,
and after training reconstruct the EMA of any length by least squares.

A power-function EMA of exponent gamma averages the weights theta(tau) seen up to step t as

    theta_hat(t) = (gamma + 1) / t^(gamma + 1) * integral_0^t tau^gamma theta(tau) dtau,

tracked step by step as ``theta_hat <- beta theta_hat + (1 - beta) theta`` with ``beta = (1 - 1/t)^(gamma + 1)``
(t counts optimizer steps from 1, so the first step copies the weights). Its length is said by
``sigma_rel``, the profile's standard deviation over its own age t: ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2
(gamma + 3))``, so gamma is the largest real root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s)`` with
``s = sigma_rel^-2``. The profile ``p_{t, gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]`` has the
closed-form inner product (for ``t_a <= t_b``)

    <p_a, p_b> = (gamma_a + 1) (gamma_b + 1) (t_a / t_b)^gamma_b / ((gamma_a + gamma_b + 1) t_b),

so the snapshots' combination closest to a wanted profile solves ``A x = b`` with A the snapshots' inner products
and b theirs with the wanted one (the normal equations of the least squares; EDM2's ``solve_posthoc_coefficients``).
The same products give the fit's relative error, which says whether a length can be reconstructed at all.

Snapshots are ``output_dir/ema-snapshots/step-XXXXXXXX-sigma-0.050.safetensors``: the tracked parameters by name,
fp32, with the step and sigma_rel in the file's metadata, each written through a temporary file and a rename.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import ConfigError, RunError

SNAPSHOTS = "ema-snapshots"
MAX_SIGMA_REL = 12**-0.5  # gamma = 0 there: the plain mean of all the weights so far (0.2887)
MAX_FIT_ERROR = 0.05  # the largest relative L2 error of a reconstructed profile this project exports
_NAME = re.compile(r"^step-(\d+)-sigma-(\d+\.\d+)\.safetensors$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function EMA's exponent for a relative standard deviation (EDM2, eq. 3 and appendix C.2)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ConfigError(f"sigma_rel={sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f}): a longer EMA than the whole run's mean")
    s = sigma_rel**-2.0
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """``<p_{t_a, gamma_a}, p_{t_b, gamma_b}>`` over [0, inf), broadcast over the arguments (module docstring)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)  # (shorter / longer)^(the longer profile's gamma)
    num = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** ratio_exp
    return num / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(steps, sigma_rels, out_step: float, out_sigma_rel: float) -> tuple[np.ndarray, float]:
    """(x, error): the weights of the snapshots (taken at ``steps`` with profiles ``sigma_rels``) whose sum is the
    closest profile to ``out_sigma_rel`` at ``out_step``, and that sum's relative L2 distance from it."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels])
    g_out = sigma_rel_to_gamma(out_sigma_rel)
    A = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])  # (N, N)
    b = profile_inner_products(t, g, out_step, g_out)  # (N,)
    # The normal equations A x = b, with the coefficients summing to 1 (a Lagrange multiplier): every profile integrates
    # to 1, so the result is an average of weights. Unconstrained, a sum of 1.0003 would scale the whole weight
    # vector by it, an error as large as the profile's mismatch itself (measured on a 40-step run: 0.029 vs 0.012).
    n = len(t)
    kkt = np.block([[A, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    x = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]  # lstsq: A is near singular where snapshots overlap
    target = profile_inner_products(out_step, g_out, out_step, g_out)
    residual = max(float(target - 2 * x @ b + x @ A @ x), 0.0)
    return x, float(np.sqrt(residual / target))


class PowerEMA:
    """Power-function EMAs of ``params`` (one fp32 copy per ``sigma_rels``), stepped once per optimizer step; a part
    of every checkpoint (``state_dict``: the step count and the copies), so a resumed run's profiles and snapshots
    are those of a run that never stopped."""

    def __init__(
        self, params: list[torch.Tensor], names: list[str], sigma_rels, output_dir: str | Path | None, every: int
    ) -> None:
        """``output_dir``: where snapshots go every ``every`` steps (None: nowhere, as on every process but the main)."""
        self.names, self.sigma_rels = list(names), [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [[p.detach().float().clone() for p in params] for _ in self.sigma_rels]
        self.output_dir, self.every = output_dir, every
        self.step_count, self.snapshot_step = 0, None  # the step of the last snapshot written

    @torch.no_grad()
    def step(self, params: list[torch.Tensor]) -> None:
        self.step_count += 1
        current = [p.detach().float() for p in params]
        for gamma, copy in zip(self.gammas, self.profiles):
            beta = (1.0 - 1.0 / self.step_count) ** (gamma + 1.0)  # 0 at the first step: the copy becomes the weights
            torch._foreach_lerp_(copy, current, 1.0 - beta)
        if self.step_count % self.every == 0:
            self.snapshot()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "profiles": [list(copy) for copy in self.profiles]}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        for copy, saved in zip(self.profiles, state["profiles"]):
            for c, s in zip(copy, saved):
                c.copy_(s)

    def to(self, device) -> PowerEMA:
        self.profiles = [[c.to(device) for c in copy] for copy in self.profiles]
        return self

    def snapshot(self) -> list[Path]:
        """Each profile as it is now, into ``output_dir/ema-snapshots/`` (nothing without an ``output_dir``, or when this
        step's are written already: the end of a run whose last step was a periodic snapshot)."""
        if self.output_dir is None or self.snapshot_step == self.step_count:
            return []
        folder = Path(self.output_dir) / SNAPSHOTS
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for sigma_rel, copy in zip(self.sigma_rels, self.profiles):
            path = folder / f"step-{self.step_count:08d}-sigma-{sigma_rel:.3f}.safetensors"
            tensors = {name: c.detach().cpu().contiguous() for name, c in zip(self.names, copy)}
            meta = {"step": str(self.step_count), "sigma_rel": repr(sigma_rel)}
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".", suffix=".tmp", delete=False) as f:
                tmp = f.name
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, path)
            except BaseException as err:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(err, OSError):  # a full disk, a read-only folder: the last checkpoint is intact
                    raise RunError(
                        f"could not write the EMA snapshot {path}: {err.strerror or err}; free space (or fix the folder) "
                        "and relaunch: it resumes from the last checkpoint"
                    ) from None
                raise
            written.append(path)
        self.snapshot_step = self.step_count
        return written


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float


def find_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """The run's snapshots, by step then sigma_rel; a run without any is an error that says how to get them."""
    folder = Path(run_dir) / SNAPSHOTS
    found = []
    for path in sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []:
        if _NAME.match(path.name):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            found.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"])))
    if not found:
        raise RunError(
            f"{run_dir} has no EMA snapshots ({folder}): train it with train.ema.kind=posthoc (and train.ema_decay=null)"
        )
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def reconstructable(snapshots: list[Snapshot], candidates, out_step: int | None = None) -> list[float]:
    """Those of ``candidates`` (sigma_rels) the snapshots reconstruct within ``MAX_FIT_ERROR``."""
    t = out_step or max(s.step for s in snapshots)
    steps, sigmas = [s.step for s in snapshots if s.step <= t], [s.sigma_rel for s in snapshots if s.step <= t]
    return [c for c in candidates if solve_coefficients(steps, sigmas, t, c)[1] <= MAX_FIT_ERROR]


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, out_step: int | None = None) -> tuple[dict, dict]:
    """({name: tensor}, what was done): the EMA of length ``sigma_rel`` at ``out_step`` (the last snapshot's step by
    default) from the snapshots taken up to it, summed one file at a time. Refused in one line when the fit's
    relative error is over ``MAX_FIT_ERROR``, naming the lengths these snapshots do reconstruct."""
    t = out_step or max(s.step for s in snapshots)
    used = [s for s in snapshots if s.step <= t]
    if not any(s.step == t for s in used):
        raise ConfigError(f"step {t} has no snapshot; this run's are at steps {sorted({s.step for s in snapshots})}")
    x, error = solve_coefficients([s.step for s in used], [s.sigma_rel for s in used], t, sigma_rel)
    if error > MAX_FIT_ERROR:
        grid = [round(v, 3) for v in np.arange(0.01, 0.285, 0.005)]
        ok = reconstructable(used, grid, t)
        span = f"{min(ok)}-{max(ok)}" if ok else "none of 0.01-0.28"
        raise ConfigError(
            f"sigma_rel={sigma_rel} is outside what this run's profiles ({sorted({s.sigma_rel for s in used})}) "
            f"reconstruct at step {t}: relative error {error:.3f} > {MAX_FIT_ERROR}; they reconstruct {span}"
        )
    total: dict[str, torch.Tensor] = {}
    for weight, snap in zip(x, used):
        with safe_open(str(snap.path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).double() * float(weight)
                total[name] = total[name] + tensor if name in total else tensor
    done = {"sigma_rel": sigma_rel, "step": t, "fit_error": round(error, 5), "snapshots": len(used)}
    return {name: v.float() for name, v in total.items()}, done
