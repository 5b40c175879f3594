"""Consistency distillation: the math against hand-computed steps and the samplers, then the job end to end on
tiny teachers (exact resume, 2 ranks = 1 rank, the exports and their diffusers round trips, early errors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchLCMScheduler, LCMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from ldm import LatentDiffusionPipeline
from ldm.consistency import DDPMConsistency, FlowConsistency, consistency_loss, guidance_embedding
from tests.conftest import ROOT, fresh_state, ldm_cfg, logged, max_difference, run_to_the_end, unet_weights
from training.config import ConfigError, load_config
from training.distill import distill as distill_job
from training.distill_config import DistillConfig, DistillJobConfig
from training.train_ldm import train as train_job

TINY_DISTILL_CONFIG = ROOT / "configs" / "distill" / "tiny.yaml"
distill, train = fresh_state(distill_job), fresh_state(train_job)


def distill_cfg(data, teacher, out, *overrides):
    return load_config(DistillJobConfig, TINY_DISTILL_CONFIG, [f"data.path={data}", f"model.teacher={teacher}",
                                                               f"output_dir={out}", *overrides])  # fmt: skip


# ---- the math --------------------------------------------------------------------------------------


def test_flow_grid_noising_euler_step_and_boundary_by_hand():
    """Grid 4, shift 1: sigma = 0, 1/4, ..., 1. At n = 2 (sigma 1/2): x = x0/2 + eps/2; the teacher's Euler step to
    sigma 1/4 is x - v/4; the consistency function is x - F/2; at n = 0 it is x whatever the network says. Shift 3
    moves the levels as the sampler's shift does: 3 s / (1 + 2 s)."""
    torch.manual_seed(0)
    x0, eps, v, out = (torch.randn(2, 4, 3, 3) for _ in range(4))
    path, n = FlowConsistency(shift=1.0, grid=4), torch.tensor([2, 2])
    assert torch.allclose(path.levels, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(path.timestep(n), torch.tensor([500.0, 500.0]))
    assert torch.allclose(path.noised(x0, eps, n), 0.5 * x0 + 0.5 * eps)
    x = path.noised(x0, eps, n)
    assert torch.allclose(path.solver_step(x, n, v), x - 0.25 * v)
    assert torch.allclose(path.consistency(x, n, out), x - 0.5 * out)
    assert torch.equal(path.consistency(x, torch.tensor([0, 0]), out), x)  # the boundary condition, exactly
    assert torch.allclose(FlowConsistency(shift=3.0, grid=4).levels[1], torch.tensor(0.75 / 1.5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_ddim_step_and_boundary_by_hand(prediction_type):
    """LCM's grid on 1,000 steps with N = 50: t = 0, 19, 39, ..., 999. The DDIM step from t_n to t_{n-1} by hand
    (x0_hat and eps_hat from the eps or v prediction); c_skip = 1 and c_out = 0 at t = 0, so f(x, 0) = x."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    path = DDPMConsistency(sched.config, grid=50)
    assert path.levels[:3].tolist() == [0, 19, 39] and path.levels[-1] == 999
    torch.manual_seed(0)
    x, out = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    n = torch.tensor([10])  # t = 199 -> 179
    a, a_prev = sched.alphas_cumprod[199], sched.alphas_cumprod[179]
    if prediction_type == "epsilon":
        x0_hat, eps_hat = (x - (1 - a).sqrt() * out) / a.sqrt(), out
    else:
        x0_hat, eps_hat = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    assert torch.allclose(path.solver_step(x, n, out), a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat, atol=1e-5)
    assert torch.allclose(path.consistency(x, torch.tensor([0]), out), x)


def test_the_consistency_function_is_what_the_lcm_samplers_take_for_x0():
    """The student is trained on exactly the x_0 the samplers use: LCMScheduler's ``denoised`` at a grid timestep,
    and FlowMatchLCMScheduler's last step (to sigma 0) from sigma 1/2."""
    torch.manual_seed(0)
    x, out = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    sched = LCMScheduler(beta_schedule="scaled_linear")
    sched.set_timesteps(4)
    t = sched.timesteps[1]
    _, denoised = sched.step(out, t, x, return_dict=False)
    path = DDPMConsistency(sched.config, grid=50)
    n = torch.tensor([int((path.levels == t).nonzero())])
    assert torch.allclose(path.consistency(x, n, out), denoised, atol=1e-5)

    flow = FlowMatchLCMScheduler(shift=1.0)
    flow.set_timesteps(sigmas=[0.5])
    x0 = flow.step(out, flow.timesteps[0], x, return_dict=False)[0]
    assert torch.allclose(FlowConsistency(grid=2).consistency(x, torch.tensor([1]), out), x0, atol=1e-6)


def test_pseudo_huber_distance_and_the_guidance_embedding():
    """sqrt(d^2 + c^2) - c per element, averaged per sample (~|d| for |d| >> c, ~d^2 / 2c near 0); the embedding is
    diffusers' sinusoidal one of (w - 1) * 1000: its cosine half is 1 at w = 1."""
    a, b = torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert torch.allclose(consistency_loss(a, b, "huber", 1.0), torch.tensor([(np.sqrt(10) - 1 + 0) / 2, 0.0]).float())
    assert torch.allclose(consistency_loss(a, b, "l2"), torch.tensor([4.5, 0.0]))
    emb = guidance_embedding(torch.tensor([1.0, 3.0]), dim=8)
    assert emb.shape == (2, 8) and torch.equal(emb[0, 4:], torch.ones(4)) and torch.equal(emb[0, :4], torch.zeros(4))
    assert not torch.allclose(emb[1], emb[0])


# ---- the job ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers(openmoji_small, tiny_vae, tmp_path_factory):
    """Two tiny teachers with CLIP text encoders (so diffusers' StableDiffusionPipeline loads their students): DDPM eps
    and rectified flow with shift 2, 6 steps each."""
    root = tmp_path_factory.mktemp("teachers")
    common = ["train.sample_every=100", "model.check_images=0", f"cache.dir={root / 'cache'}", "train.mixed_precision=fp32"]
    train(ldm_cfg(openmoji_small, tiny_vae, root / "ddpm", *common))
    train(ldm_cfg(openmoji_small, tiny_vae, root / "flow", *common, "objective.type=flow", "objective.shift=2.0"))
    return {"ddpm": root / "ddpm" / "pipeline", "flow": root / "flow" / "pipeline"}


def test_a_new_student_is_its_teacher_at_every_guidance_scale(teachers):
    """The guidance embedding starts at zero, so before any step the full student predicts what the teacher does,
    whatever the scale; a LoRA student starts as the teacher too (peft's B matrices are zero)."""
    from training.distill_config import DistillConfig
    from training.stage2.student import build_student, load_teacher

    teacher = load_teacher(str(teachers["flow"]))
    torch.manual_seed(0)
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 5, teacher.unet.config.cross_attention_dim)
    with torch.no_grad():
        want = teacher.unet(x, t, encoder_hidden_states=states).sample
        student = build_student(teacher, DistillConfig(method="lcm"))
        for w in (1.0, 4.0):
            got = student(x, t, encoder_hidden_states=states, timestep_cond=guidance_embedding(torch.full((2,), w))).sample
            assert torch.allclose(got, want, atol=1e-5)
        lora = build_student(teacher, DistillConfig(method="lcm-lora", lora_rank=4, lora_alpha=4.0))
        assert torch.allclose(lora(x, t, encoder_hidden_states=states).sample, want, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.unet.parameters())


def test_a_flow_student_resumes_exactly_exports_flow_lcm_and_samples_at_1_2_4_steps(teachers, openmoji_small, tmp_path):
    """LCM on the flow teacher (shift 2): killed after step 3 and relaunched, the student (and through it the target
    network's EMA, which the last steps' targets come from) is bit-identical to a run that never stopped. The folder's
    scheduler is FlowMatchLCM with the teacher's shift, its sampling.json says 4 steps at guidance 3, its U-Net has the
    guidance embedding (and the scale changes the image), and the sample grid has the student at 1, 2 and 4 steps."""
    common = [f"cache.dir={tmp_path / 'cache'}", "train.mixed_precision=fp32"]
    distill(distill_cfg(openmoji_small, teachers["flow"], tmp_path / "full", *common))
    distill(distill_cfg(openmoji_small, teachers["flow"], tmp_path / "resumed", *common), stop_after_steps=3)
    assert not (tmp_path / "resumed" / "pipeline").exists()
    distill(distill_cfg(openmoji_small, teachers["flow"], tmp_path / "resumed", *common))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert full["time_embedding.cond_proj.weight"].abs().max() > 0  # the embedding trained
    losses = logged(tmp_path / "full", "loss")
    assert [r["step"] for r in losses] == [2, 4, 6] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)

    folder = tmp_path / "full" / "pipeline"
    assert json.loads((folder / "sampling.json").read_text()) == {"steps": 4, "guidance": 3.0, "scheduler": "lcm"}
    pipe = LatentDiffusionPipeline.from_pretrained(folder, dtype="fp32")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.scheduler.config.shift == 2.0
    assert pipe.unet.config.time_cond_proj_dim == 256
    images = {w: pipe(["red apple"], num_inference_steps=4, guidance_scale=w, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images for w in (2.0, 5.0)}  # fmt: skip
    assert images[2.0].shape == (1, 32, 32, 3) and np.abs(images[2.0] - images[5.0]).max() > 1e-4
    # 4 steps at sigma 1, 3/4, 1/2, 1/4 before the shift of 2 (the scheduler's own spacing ends at 0.001, a wasted step)
    assert torch.allclose(pipe.scheduler.sigmas, torch.tensor([1.0, 1.5 / 1.75, 1 / 1.5, 0.5 / 1.25, 0.0]))
    grid = Image.open(tmp_path / "full" / "samples" / "step-00000006.png")  # 2 prompts x (1, 2, 4 steps) x 2 images, x2
    assert grid.size == (3 * 2 * 64, 2 * 64)

    # the command and the page default to the student's steps, guidance and sampler; a flag still wins
    from ldm import generate
    from ldm.app import build_app

    (made,) = generate.main(["--model", str(folder), "--prompt", "red apple", "--out", str(tmp_path / "gen"), "--dtype", "fp32"])
    assert "Steps: 4, Sampler: lcm, CFG scale: 3.0" in Image.open(made).info["parameters"]
    (made,) = generate.main(["--model", str(folder), "--prompt", "red apple", "--out", str(tmp_path / "gen2"), "--steps", "2"])
    assert "Steps: 2, Sampler: lcm" in Image.open(made).info["parameters"]
    page = {c.label: c.value for c in build_app(pipe).blocks.values() if getattr(c, "label", None) in ("Steps", "Guidance", "Sampler")}
    assert page == {"Steps": 4, "Guidance": 3.0, "Sampler": "lcm"}


def test_a_ddpm_student_full_and_lora_makes_the_same_image_in_diffusers(teachers, openmoji_small, tmp_path):
    """DDPM teacher. The full student's folder (LCMScheduler) gives diffusers' StableDiffusionPipeline's image at
    4 steps and guidance 3 (the embedding of w - 1, no unconditional pass). LCM-LoRA: the adapters loaded into the
    teacher with diffusers' load_lora_weights, and LCMScheduler, give the exported student's image at guidance 1, in
    this pipeline and in diffusers'."""
    common = [f"cache.dir={tmp_path / 'cache'}", "train.mixed_precision=fp32"]
    distill(distill_cfg(openmoji_small, teachers["ddpm"], tmp_path / "lcm", *common))
    args = {"num_inference_steps": 4, "output_type": "np"}
    folder = tmp_path / "lcm" / "pipeline"
    ours = LatentDiffusionPipeline.from_pretrained(folder, dtype="fp32")
    assert isinstance(ours.scheduler, LCMScheduler)
    sd = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref = sd(["red apple"], guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **args).images
    image = ours(["red apple"], guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **args).images
    assert np.abs(image - ref).max() < 1e-3 and image.std() > 0.01

    distill(distill_cfg(openmoji_small, teachers["ddpm"], tmp_path / "lora", *common, "distill.method=lcm-lora", "train.lr=0.02"))
    assert json.loads((tmp_path / "lora" / "pipeline" / "sampling.json").read_text())["guidance"] == 1.0
    student = LatentDiffusionPipeline.from_pretrained(tmp_path / "lora" / "pipeline", dtype="fp32")
    want = student(["red apple"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **args).images
    loaded = LatentDiffusionPipeline.from_pretrained(teachers["ddpm"], dtype="fp32")
    targets = DistillConfig().lora_target_modules  # every one of them comes back from the file, not only q/k/v/out
    wanted = {name for name, m in loaded.unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith(f".{t}") for t in targets)}  # fmt: skip
    loaded.load_lora_weights(str(tmp_path / "lora" / "lora"))
    assert wanted and {name for name, m in loaded.unet.named_modules() if hasattr(m, "lora_A")} == wanted
    loaded.set_scheduler("lcm")
    got = loaded(["red apple"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **args).images
    assert np.abs(got - want).max() < 1e-3
    sd = StableDiffusionPipeline.from_pretrained(teachers["ddpm"], safety_checker=None, requires_safety_checker=False)
    sd.load_lora_weights(str(tmp_path / "lora" / "lora"))
    sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
    assert np.abs(sd(["red apple"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **args).images - want).max() < 1e-3
    teacher = LatentDiffusionPipeline.from_pretrained(teachers["ddpm"], dtype="fp32")
    teacher.set_scheduler("lcm")
    plain = teacher(["red apple"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **args).images
    assert np.abs(plain - want).max() > 1e-3  # the adapters changed the image


def test_two_ranks_distil_what_one_does(teachers, openmoji_small, tmp_path):
    """accelerate launch with 2 processes of batch 4 ends with the student of 1 process with batch 8, and logs its losses."""
    accelerate = Path(sys.executable).parent / "accelerate"
    common = ["-m", "training.distill", "--config", str(TINY_DISTILL_CONFIG), f"model.teacher={teachers['flow']}",
              f"data.path={openmoji_small}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=4", "train.checkpoint_every=4",
              "train.sample_every=100", "train.mixed_precision=fp32"]  # fmt: skip
    for name, procs, batch in (("one", ["--num_processes", "1"], 8), ("two", ["--multi_gpu", "--num_processes", "2"], 4)):
        cmd = [str(accelerate), "launch", *procs, *common, f"output_dir={tmp_path / name}", f"train.batch_size={batch}"]
        run_to_the_end(cmd, tmp_path / name)
    one_w, two_w = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    teacher = load_file(str(teachers["flow"] / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((one_w[k] - teacher[k]).abs().max().item() for k in teacher)  # 4 Adam steps of LR 1e-3
    assert max_difference(one_w, two_w) < 1e-4 < 10 * 1e-4 < moved  # summation order only
    one, two = (np.array([r["loss"] for r in logged(tmp_path / n, "loss")]) for n in ("one", "two"))
    assert len(one) == 2 and np.allclose(one, two, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.method=dmd"], "distill.method='dmd' is unknown; valid: lcm, lcm-lora"),
        (["distill.guidance_min=6"], "need 1 <= min <= max"),
        (["eval.guidance=5"], "eval.guidance=5.0 would be ignored"),
        (["cache.text=false"], "cache.text=false: distillation reads"),
    ],
)
def test_bad_settings_are_one_line_before_any_work(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        distill_cfg(tmp_path, tmp_path, tmp_path / "out", *overrides)


def test_a_teacher_that_is_not_a_pipeline_folder_is_one_line(openmoji_small, tmp_path):
    import subprocess

    from tests.conftest import error_line

    (tmp_path / "weights.ckpt").write_bytes(b"not a pipeline")
    for teacher, said in ((tmp_path, "is not a pipeline folder: it has no model_index.json"),
                          (tmp_path / "weights.ckpt", "a pickle checkpoint")):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "training.distill", "--config", str(TINY_DISTILL_CONFIG),
                               f"model.teacher={teacher}", f"data.path={openmoji_small}", f"output_dir={tmp_path / 'out'}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
        assert done.returncode != 0 and said in error_line(done.stderr)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # the run's lock only: no cache, no checkpoint
