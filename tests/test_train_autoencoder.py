"""End-to-end runs of the stage-1 job on tiny configs (seconds each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from autoencoder import load_autoencoder
from runtime.errors import RunError
from tests.conftest import FROZEN_STEPS, ROOT, TINY_AE_CONFIG, autoencoder_cfg, fresh_state, logged, run_to_the_end, write_imagefolder
from training.config import load_config
from training.train_autoencoder import AutoencoderJobConfig
from training.train_autoencoder import train as train_job

train = fresh_state(train_job)


@pytest.fixture(scope="module")
def tiny_run(openmoji_small, tmp_path_factory):
    """One tiny stage-1 run shared by the read-only checks below."""
    out = tmp_path_factory.mktemp("ae") / "run"
    train(autoencoder_cfg(openmoji_small, out))
    return out


def test_tiny_run_exports_a_loadable_autoencoder_with_metrics(tiny_run, openmoji_small):
    vae = load_autoencoder(tiny_run / "vae")
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0  # fitted, not the SD default
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert {"psnr", "ssim", "lpips", "scaling_factor"} <= set(metrics) and metrics["split"] == "test"
    assert metrics["num_images"] == len((openmoji_small / "test" / "metadata.jsonl").read_text().splitlines())
    assert metrics["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    # PSNR by hand: each held-out PNG on white, through the exported autoencoder (posterior mean), clamped
    names = [json.loads(line)["file_name"] for line in (openmoji_small / "test" / "metadata.jsonl").read_text().splitlines()]
    on_white = [Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), Image.open(openmoji_small / "test" / n).convert("RGBA"))
                for n in names]  # fmt: skip
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in on_white]).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    by_hand = (10 * torch.log10(4 / ((y - x) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    assert metrics["psnr"] == pytest.approx(by_hand, abs=0.01)


def test_tiny_run_logs_samples_and_keeps_the_last_checkpoints(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    log = [r for r in records if "l1" in r]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert "g_loss" not in log[1] and "g_loss" in log[-1]  # the GAN switches on at loss.disc_start=4
    val = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in val] == [4, 8] and val[-1]["val_images"] == json.loads((tiny_run / "metrics.json").read_text())["num_images"]
    # the last is the held-out PSNR of the exported weights (every held-out image fits the preview here)
    assert val[-1]["val_psnr"] == pytest.approx(json.loads((tiny_run / "metrics.json").read_text())["psnr"], abs=0.01)
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["step-00000004.png", "step-00000008.png"]
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008"]  # keep_checkpoints=2, nothing temporary left
    assert (tiny_run / "config.yaml").read_text().count("preset: tiny") == 1


def test_evaluate_cli_reports_the_same_metrics(tiny_run, openmoji_small, tmp_path):
    out = tmp_path / "m.json"
    result = subprocess.run([sys.executable, "-m", "training.evaluate", "autoencoder", "--vae", str(tiny_run / "vae"),
                             "--data", str(openmoji_small / "test"), "--out", str(out), "--grid", str(tmp_path / "g.png")],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    printed = json.loads(result.stdout)
    n = min(12, printed["num_images"])
    assert Image.open(tmp_path / "g.png").size == (n * 32 * 3, 2 * 32 * 3)  # n inputs over n reconstructions
    assert printed == json.loads(out.read_text())
    expected = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "lpips", "num_images"):
        assert printed[key] == pytest.approx(expected[key], rel=1e-4)


def test_loss_decreases(openmoji_small, tmp_path):
    cfg = autoencoder_cfg(openmoji_small, tmp_path / "run", "train.max_steps=40", "train.lr=2e-3", "loss.disc_start=1000",
                   "train.checkpoint_every=40", "train.sample_every=40", "train.log_every=5")
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"l1"' in line]
    first, last = log[0], log[-1]
    assert last["l1"] < 0.7 * first["l1"] and last["lpips"] < first["lpips"]


def _weights(run):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "model_1.safetensors")


def test_resume_equals_an_uninterrupted_run(tiny_run, openmoji_small, tmp_path):
    straight, resumed = tiny_run, tmp_path / "resumed"
    train(autoencoder_cfg(openmoji_small, resumed), stop_after_steps=4)  # "killed" after the step-4 checkpoint
    assert not (resumed / "vae").exists()
    train(autoencoder_cfg(openmoji_small, resumed))  # the same command again resumes
    (vae_a, disc_a), (vae_b, disc_b) = _weights(straight), _weights(resumed)
    for a, b in ((vae_a, vae_b), (disc_a, disc_b)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    exported_a = load_file(straight / "vae" / "diffusion_pytorch_model.safetensors")
    exported_b = load_file(resumed / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (straight, resumed))
    assert ma["psnr"] == mb["psnr"] and ma["scaling_factor"] == mb["scaling_factor"]
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines() if '"l1"' in line]
    assert steps == [2, 4, 6, 8]  # the resumed run appended where the first stopped


def test_gradient_accumulation_and_bf16_run(openmoji_small, tmp_path):
    cfg = autoencoder_cfg(openmoji_small, tmp_path / "run", "train.max_steps=2", "train.grad_accum_steps=2",
                   "train.mixed_precision=bf16", "loss.disc_start=1", "train.checkpoint_every=2")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["micro_batches"] == 4  # 2 optimizer steps x 2 micro-batches
    adam = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    assert {int(v["step"]) for v in adam.values()} == {2}  # ...and the optimizer stepped twice
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["mixed_precision"] == "bf16"
    vae = load_autoencoder(tmp_path / "run" / "vae")  # trained in bf16, exported in fp32, finite
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in vae.parameters())


def test_unreadable_images_are_skipped_and_counted(openmoji_small, tmp_path):
    data = tmp_path / "data"
    lines = (openmoji_small / "train" / "metadata.jsonl").read_text().splitlines()[:24]
    images = {json.loads(line)["file_name"]: (openmoji_small / "train" / json.loads(line)["file_name"]).read_bytes() for line in lines}
    images["zz-broken.png"] = b"\x89PNG\r\n\x1a\n truncated"
    write_imagefolder(data, images, {k: "x" for k in images})
    cfg = autoencoder_cfg(data, tmp_path / "run", "train.max_steps=6", "data.eval_split=null", "train.checkpoint_every=6")
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"l1"' in line]
    assert log[-1]["bad_images"] >= 1  # 6 steps x 8 covers all 25 images at least once
    assert "psnr" not in json.loads((tmp_path / "run" / "metrics.json").read_text())  # no held-out split


def test_accelerate_launch_command(openmoji_small, tmp_path):
    """The documented command, through accelerate's launcher."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "-m", "training.train_autoencoder", "--config", str(TINY_AE_CONFIG),
           f"data.path={openmoji_small}", f"output_dir={tmp_path / 'r'}", "train.max_steps=2", "train.checkpoint_every=2"]
    subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert (tmp_path / "r" / "vae" / "config.json").is_file()
    start = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    # accelerate launch exports OMP_NUM_THREADS=1; the job still uses every core it may
    assert start["event"] == "start" and start["cpu_threads"] == len(os.sched_getaffinity(0))


def test_two_processes_train_with_ddp(openmoji_small, tmp_path):
    """Two CPU ranks (gloo): the autoencoder goes through DDP's forward and the GAN step works."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "training.train_autoencoder",
           "--config", str(TINY_AE_CONFIG), f"data.path={openmoji_small}", f"output_dir={tmp_path / 'r'}",
           "train.batch_size=4", "train.max_steps=4", "loss.disc_start=2", "train.checkpoint_every=4"]
    run_to_the_end(cmd, tmp_path / "r")
    records = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert records[0]["processes"] == 2 and records[0]["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    steps = [r for r in records if "l1" in r]
    assert "g_loss" in steps[-1]
    # the LR schedule advances once per optimizer step, not once per process: cosine after 2
    # warm-up steps is at half its peak on the 4th (last) step
    assert steps[-1]["lr"] == pytest.approx(0.5 * 4e-4)
    assert (tmp_path / "r" / "vae" / "config.json").is_file()


@pytest.mark.parametrize("changed", ["train.batch_size=4", "seed=1", "train.grad_accum_steps=2", "processes"])
def test_resume_with_a_different_batch_layout_is_refused(tiny_run, tmp_path, changed):
    """Each setting that fixes the position in the data. The process count: the checkpoint is made to say it was
    written by 2 processes (its manifest updated, so that it still verifies), and this run has 1."""
    import shutil

    from runtime.files import file_digest, write_json_atomic

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    key, value = changed.removeprefix("train.").split("=") if "=" in changed else ("num_processes", "1")
    was = {"batch_size": 8, "seed": 0, "grad_accum_steps": 1, "num_processes": 2}[key]
    if changed == "processes":
        ckpt = run / "checkpoints" / "step-00000008"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["num_processes"] == 1
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["trainer_state.json"] = {"bytes": (ckpt / "trainer_state.json").stat().st_size,
                                                   "sha256": file_digest(ckpt / "trainer_state.json")}  # fmt: skip
        write_json_atomic(ckpt / "manifest.json", manifest)
    overrides = [changed] if "=" in changed else []
    with pytest.raises(RunError, match=f"written with {key}={was}, this run has {key}={value}. Use the same setting"):
        train(autoencoder_cfg(tiny_run.parent, run, *overrides, "train.max_steps=12"))


def test_raising_max_steps_extends_a_finished_run(tiny_run, openmoji_small, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    train(autoencoder_cfg(openmoji_small, run, "train.max_steps=10"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "resume"] == [8] and [r["step"] for r in log if "l1" in r][-2:] == [8, 10]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    before, after = (load_file(r / "vae" / "diffusion_pytorch_model.safetensors") for r in (tiny_run, run))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # exported again, two steps on


def test_fp16_is_refused_before_training(openmoji_small, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train(autoencoder_cfg(openmoji_small, tmp_path / "r", "train.mixed_precision=fp16"))
    assert not (tmp_path / "r").exists()


def test_cli_errors_before_training(tmp_path, capsys):
    """A misspelt key is refused with the valid one named, before any training work (in this process:
    `python -m` of the command is the launch test's, and a missing dataset's line is test_runtime_errors')."""
    from training.train_autoencoder import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(TINY_AE_CONFIG), f"output_dir={tmp_path / 'r'}", "train.max_stepz=3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "train.max_stepz" in err and "max_steps" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_decoder_only_fine_tune_keeps_the_encoder_bit_identical(openmoji_small, tmp_path):
    from autoencoder import build_autoencoder, load_autoencoder, save_autoencoder, set_latent_normalization
    from training.train_autoencoder import train

    train_ae = fresh_state(train)

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", 32)
    set_latent_normalization(vae, 0.7, None)
    start = save_autoencoder(vae, tmp_path / "vae")
    cfg = autoencoder_cfg(openmoji_small, tmp_path / "run", f"model.init_from={start}", "train.decoder_only=true",
                          "train.max_steps=4", "train.checkpoint_every=4")
    train_ae(cfg)
    before, after = load_file(str(start / "diffusion_pytorch_model.safetensors")), load_file(str(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert load_autoencoder(tmp_path / "run" / "vae").config.scaling_factor == 0.7  # the latent space's scale is kept
    with pytest.raises(ValueError, match="needs model.init_from"):
        train_ae(load_config(AutoencoderJobConfig, TINY_AE_CONFIG, ["train.decoder_only=true"]))


def test_stage_1_trains_on_buckets_and_resumes_exactly(mixed_shapes, tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import autoencoder_cfg, fresh_state
    from training.train_autoencoder import train as job

    train = fresh_state(job)
    on = ["data.buckets.enabled=true", "train.max_steps=6", "train.checkpoint_every=2", "train.sample_every=100"]
    train(autoencoder_cfg(mixed_shapes, tmp_path / "full", *on))
    train(autoencoder_cfg(mixed_shapes, tmp_path / "resumed", *on), stop_after_steps=4)
    train(autoencoder_cfg(mixed_shapes, tmp_path / "resumed", *on))
    a, b = (load_file(str(tmp_path / r / "vae" / "diffusion_pytorch_model.safetensors")) for r in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    (event,) = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"buckets"' in line]
    sizes = dict(zip(event["sizes"], event["images"]))  # tiny autoencoder: f=4, buckets of 32^2 pixels in steps of 4
    assert (sizes["48x20"], sizes["32x32"], sizes["20x48"]) == (16, 16, 16) and sum(event["images"]) == 48  # tall, square, wide


def test_the_first_losses_of_a_tiny_fp32_run_are_frozen(noise_images, tmp_path):
    """A regression pin in diffusers' style: the logged losses of 4 fp32 steps on seeded noise images. They move when
    the loss, the data path, the optimiser or the initialisation changes (or diffusers' AutoencoderKL does); the
    tolerance covers oneDNN's kernels on the CPUs these machines have (AVX2 vs AVX-512 differ by ~5e-6)."""
    train(autoencoder_cfg(noise_images, tmp_path / "run", *FROZEN_STEPS))
    frozen = [
        {"step": 2, "l1": 0.591912, "lpips": 0.581558, "kl": 25.769874},
        {"step": 4, "l1": 0.558756, "lpips": 0.484601, "kl": 25.135811},
    ]
    for got, want in zip(logged(tmp_path / "run", "l1", "lpips", "kl"), frozen, strict=True):
        assert got == pytest.approx(want, rel=1e-4), (got, want)
