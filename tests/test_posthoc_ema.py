"""Post-hoc EMA (EDM2): the power-function profiles against their closed forms, the least-squares reconstruction,
and a tiny stage-2 run whose third tracked profile is reconstructed from the other two and exported. Exact resume
and 2 ranks = 1 rank of the snapshots: tests/test_run_guard.py's two-rank SIGTERM test."""

from __future__ import annotations

import errno
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import error_line, fresh_state, ldm_cfg
from training import posthoc_ema
from training.config import ConfigError, RunError
from training.run.posthoc_ema import (
    MAX_FIT_ERROR,
    PowerEMA,
    find_snapshots,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from training.train_ldm import train as train_job

train = fresh_state(train_job)


def test_gamma_is_edm2s_for_each_length():
    """sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); EDM2's two profiles are gamma 16.97 and 6.94."""
    for sigma_rel in (0.02, 0.05, 0.075, 0.10, 0.2):
        g = sigma_rel_to_gamma(sigma_rel)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sigma_rel**2, rel=1e-9)
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97 and round(sigma_rel_to_gamma(0.10), 2) == 6.94
    with pytest.raises(ConfigError, match="must be in"):
        sigma_rel_to_gamma(0.3)


@pytest.mark.parametrize("overrides,message", [
    (["train.ema.kind=posthoc", "train.ema_decay=0.999"], "train.ema_decay=0.999 is the EMA of train.ema.kind=decay; a post-hoc"),
    (["train.ema.kind=posthoc", "train.ema_decay=null", "train.ema.sigma_rels=[0.05]"], "must name at least two different lengths"),
    (["train.ema.kind=posthoc", "train.ema_decay=null", "train.ema.sigma_rels=[0.05,0.3]"], "0.3 must be in (0, 0.2887)"),
    (["train.ema.kind=posthoc", "train.ema_decay=null", "model.text_encoder=clip-scratch"], "this run trains its text encoder too"),
])  # fmt: skip
def test_a_post_hoc_config_that_cannot_work_is_named(overrides, message):
    from training.config import load_config
    from training.ldm_config import LdmJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(LdmJobConfig, None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["train.ema.kind=posthoc", "train.optimizer=adafactor"])
def test_the_jobs_other_than_the_latent_models_refuse_its_own_settings(override):
    from training.autoencoder_config import AutoencoderJobConfig
    from training.config import load_config
    from training.distill_config import DistillJobConfig

    for schema in (AutoencoderJobConfig, DistillJobConfig):
        with pytest.raises(ConfigError, match=r"is for the latent model \(training.train_ldm\) so far"):
            load_config(schema, None, [override, "train.ema_decay=null"])


def test_the_step_rule_is_the_power_function_average():
    """Tracked with beta = (1 - 1/t)^(gamma + 1) over weights theta(t) = t, the EMA at step T is the profile's average
    of tau: (gamma + 1) / (gamma + 2) T, up to the steps' discreteness (half a step)."""
    theta = torch.zeros(1)
    ema = PowerEMA([theta], ["theta"], [0.05, 0.10], None, every=10**9)
    for t in range(1, 2001):
        theta.fill_(float(t))
        ema.step([theta])
    for gamma, copy in zip(ema.gammas, ema.profiles):
        assert copy[0].item() == pytest.approx((gamma + 1) / (gamma + 2) * 2000, abs=0.6)


def test_the_inner_products_are_the_integrals_of_the_profiles():
    tau = np.linspace(0.0, 100.0, 2_000_001)
    for t_a, s_a, t_b, s_b in ((70.0, 0.05, 100.0, 0.10), (100.0, 0.10, 40.0, 0.05), (60.0, 0.2, 60.0, 0.05)):
        g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
        p_a = np.where(tau <= t_a, (g_a + 1) * tau**g_a / t_a ** (g_a + 1), 0.0)
        p_b = np.where(tau <= t_b, (g_b + 1) * tau**g_b / t_b ** (g_b + 1), 0.0)
        assert profile_inner_products(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-4)


def test_a_tracked_profile_is_reconstructed_as_its_own_snapshot(tmp_path):
    torch.manual_seed(0)
    weights = torch.zeros(64)
    ema = PowerEMA([weights], ["w"], [0.05, 0.10], tmp_path, every=10)
    for _ in range(100):
        weights.add_(torch.randn(64))  # a random walk: every step's weights differ
        ema.step([weights])
    assert ema.snapshot() == []  # step 100's are written already (the end of a run on a periodic step)
    snapshots = find_snapshots(tmp_path)
    assert [(s.step, s.sigma_rel) for s in snapshots[:2]] == [(10, 0.05), (10, 0.10)] and len(snapshots) == 20
    x, error = solve_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots], 100, 0.05)
    assert error < 1e-6 and x[-2] == pytest.approx(1.0, abs=1e-6)  # the last 0.05 snapshot, alone
    rebuilt, done = reconstruct(snapshots, 0.05)
    assert torch.allclose(rebuilt["w"], ema.profiles[0][0], atol=1e-4) and done["step"] == 100
    with pytest.raises(ConfigError, match=r"outside what this run's profiles .* reconstruct at step 100: .*they reconstruct 0\.0"):
        reconstruct(snapshots, 0.28)
    with pytest.raises(RunError, match="has no EMA snapshots"):
        find_snapshots(tmp_path / "nothing")


def test_a_snapshot_that_cannot_be_written_stops_in_one_line_and_leaves_no_part(tmp_path, monkeypatch):
    from training.run import posthoc_ema

    def full_disk(tensors, path, metadata):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(posthoc_ema, "save_file", full_disk)
    ema = PowerEMA([torch.zeros(3)], ["w"], [0.05, 0.10], tmp_path, every=1)
    with pytest.raises(RunError, match=r"could not write the EMA snapshot .*step-00000001-sigma-0.050.safetensors: No space left"):
        ema.step([torch.ones(3)])
    assert list((tmp_path / "ema-snapshots").iterdir()) == []


def test_a_third_profile_tracked_in_a_run_is_its_reconstruction_and_exports(openmoji_small, tiny_vae, tmp_path, capsys):
    """A tiny stage-2 run tracks 0.05, 0.075 and 0.10; the 0.075 EMA rebuilt from the 0.05 and 0.10 snapshots alone (10
    of each) is the one tracked, within 1% of the distance between that EMA and the trained weights (0.2% measured; 10% with the coefficients unconstrained to sum to 1, worse than the two snapshots' plain average). The command
    exports it, from all three profiles, as a pipeline whose U-Net is the tracked 0.075 EMA."""
    out = tmp_path / "run"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "model.text_encoder=minilm", "train.ema_decay=null", "train.ema.kind=posthoc",
                  "train.ema.sigma_rels=[0.05,0.075,0.10]", "train.ema.snapshot_every=4", "train.max_steps=40",
                  "train.checkpoint_every=40", "train.sample_every=40", "train.lr_schedule=constant", f"cache.dir={tmp_path / 'cache'}"))  # fmt: skip
    snapshots = find_snapshots(out)
    assert {s.step for s in snapshots} == set(range(4, 41, 4))
    two = [s for s in snapshots if s.sigma_rel != 0.075]
    rebuilt, done = reconstruct(two, 0.075)
    tracked = load_file(str(out / "ema-snapshots" / "step-00000040-sigma-0.075.safetensors"))
    unet = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))  # the trained weights
    miss = sum((rebuilt[k] - tracked[k]).pow(2).sum() for k in tracked).sqrt()
    lag = sum((unet[k] - tracked[k]).pow(2).sum() for k in tracked).sqrt()
    assert done["fit_error"] < MAX_FIT_ERROR and miss < 0.01 * lag, (miss, lag, done)

    posthoc_ema.main(["--run", str(out), "--sigma-rel", "0.075", "--out", str(tmp_path / "ema")])
    exported = load_file(str(tmp_path / "ema" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(exported[k], tracked[k], atol=1e-6) for k in tracked)  # with all three: the tracked one
    metrics = json.loads((tmp_path / "ema" / "metrics.json").read_text())
    assert metrics["posthoc_ema"]["sigma_rel"] == 0.075 and metrics["steps"] == 40
    capsys.readouterr()
    with pytest.raises(SystemExit):
        posthoc_ema.main(["--run", str(out), "--sigma-rel", "0.28", "--out", str(tmp_path / "x")])
    said = error_line(capsys.readouterr().err)
    assert said.startswith("error: sigma_rel=0.28 is outside what this run's profiles ([0.05, 0.075, 0.1])") and not (tmp_path / "x").exists()
