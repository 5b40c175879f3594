"""Stage 2 end to end on tiny configs: export, latent cache, exact resume, 2 ranks, early errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from autoencoder.model import build_autoencoder, save_autoencoder
from ldm import LatentDiffusionPipeline
from ldm.generate import generation_defaults
from tests.conftest import FAST_STEPS, FROZEN_STEPS, ROOT, TINY_LDM_CONFIG, fresh_state, ldm_cfg, logged, max_difference, same_weights, unet_weights
from training.stage2.models import check_compatible
from training.train_ldm import train as train_job

train = fresh_state(train_job)


@pytest.fixture(scope="module")
def clip_run(openmoji_small, tiny_vae, tmp_path_factory):
    """clip-scratch: the text encoder trains with the U-Net (nothing textual is cached)."""
    out = tmp_path_factory.mktemp("ldm") / "clip"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=10", "train.checkpoint_every=5", "train.sample_every=5"))
    return out


def test_run_exports_a_pipeline_that_generates(clip_run):
    pipe = LatentDiffusionPipeline.from_pretrained(clip_run / "pipeline", dtype="fp32")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.default_resolution == 32
    images = pipe(["red apple"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    metrics = json.loads((clip_run / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["cached_images"] > 100
    sample = metrics["config"]["sample"]  # the command and the page sample as the run's own grids did
    assert generation_defaults(clip_run / "pipeline") == {"steps": sample["steps"], "guidance": sample["guidance"], "scheduler": sample["scheduler"]}


def test_run_logs_a_falling_loss_samples_and_checkpoints(clip_run):
    records = [json.loads(line) for line in (clip_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert sorted(p.name for p in (clip_run / "samples").iterdir()) == ["step-00000005.png", "step-00000010.png"]
    assert sorted(p.name for p in (clip_run / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]


def test_trained_text_encoder_is_exported(clip_run):
    """clip-scratch trains jointly: its weights move between checkpoints and the export holds the last ones."""
    ckpt = {step: load_file(str(clip_run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")) for step in (5, 10)}
    exported = load_file(str(clip_run / "pipeline" / "text_encoder" / "model.safetensors"))
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ckpt[5][f"text_encoder.{key}"], ckpt[10][f"text_encoder.{key}"])
    assert torch.equal(exported[key], ckpt[10][f"text_encoder.{key}"])


def test_resume_equals_an_uninterrupted_run_with_a_frozen_cached_encoder_and_a_time_budget(openmoji_small, tiny_vae, tmp_path, monkeypatch):
    """MiniLM: frozen, its caption states come from the cache. A run with train.max_minutes=0.5 on a clock where a step
    takes 2 s: timed from step 1 to step 6 (10 s), 12 s spent, 18 s left: max_steps 15 of the cap's 20. Killed after
    step 8, relaunched: it ends at step 15 with the final EMA U-Net bit-identical to a 15-step run that never stopped
    and had no budget (the schedule is constant after its warm-up, so the horizon does not change it)."""
    from training import run
    from training.run import budget

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(budget, "WARMUP_STEPS", 1)
    monkeypatch.setattr(budget, "PROBE_STEPS", 2)
    step_done = run.after_optimizer_step

    def two_seconds_a_step(*args):
        clock.now += 2.0
        step_done(*args)

    monkeypatch.setattr(run, "after_optimizer_step", two_seconds_a_step)
    common = ["model.text_encoder=minilm", "train.checkpoint_every=4", "train.sample_every=100", f"cache.dir={tmp_path / 'cache'}"]
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "full", *common, "train.max_steps=15"))
    timed = [*common, "train.max_steps=20", "train.max_minutes=0.5"]
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *timed), stop_after_steps=8)
    assert not (tmp_path / "resumed" / "pipeline").exists()
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["budget_max_steps"] == 15 and state["budget_seconds"] == 16.0
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *timed))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["steps"] == 15
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    # every launch checks the autoencoder on the data first, then starts or resumes; the budget is fixed once
    assert [r["event"] for r in log if "event" in r] == ["start", "autoencoder_check", "budget", "resume", "autoencoder_check"]
    fixed = next(r for r in log if r.get("event") == "budget")
    assert (fixed["step"], fixed["seconds_per_step"], fixed["seconds_so_far"], fixed["max_steps"]) == (6, 2.0, 12.0, 15)
    assert logged(tmp_path / "resumed", "loss")[-1]["step"] == 15


def test_latent_cache_is_reused_rebuilt_on_a_new_key_and_never_runs_in_the_step(openmoji_small, tiny_vae, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    cache = tmp_path / "cache"
    # model.check_images=0: the up-front autoencoder check encodes images by design; here only the cache may
    args = ["train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=100", f"cache.dir={cache}", "model.check_images=0"]
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "a", *args))
    (first,) = [p for p in cache.iterdir() if p.is_dir()]
    key = json.loads((first / "key.json").read_text())
    assert key["resolution"] == 32 and key["text_encoder"] is None  # clip-scratch: no caption states cached
    stamp = (first / "shard-00000.safetensors").stat().st_mtime_ns

    # an unchanged key: reused, and the autoencoder's encoder is never called
    calls = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "b", *args))
    assert calls == [] and (first / "shard-00000.safetensors").stat().st_mtime_ns == stamp

    # an interrupted encode resumes: only the missing shard is encoded again
    (first / "complete.json").unlink()
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "c", *args))
    assert calls == [] and (first / "complete.json").is_file()

    # another autoencoder: a new key, a rebuilt cache, the stale one removed
    torch.manual_seed(1)
    other_vae = save_autoencoder(build_autoencoder("tiny", 32), tmp_path / "vae2")
    train(ldm_cfg(openmoji_small, other_vae, tmp_path / "d", *args))
    (second,) = [p for p in cache.iterdir() if p.is_dir()]
    assert second != first and len(calls) > 0


def test_a_frozen_encoders_caption_states_are_cached_in_bf16_or_encoded_each_step_with_cache_text_false(openmoji_small, tiny_vae, tmp_path):
    args = ["model.text_encoder=minilm", "train.max_steps=2", "train.sample_every=100", "model.check_images=0", "eval.num_prompts=0"]
    for text, run in ((True, "cached"), (False, "per-step")):
        train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / run, *args, f"cache.text={str(text).lower()}"))
        (folder,) = (tmp_path / run / "latent-cache").iterdir()
        shard = load_file(str(folder / "shard-00000.safetensors"))
        key = json.loads((folder / "key.json").read_text())
        states, mask = shard.get("text_states@32x32"), shard.get("text_mask@32x32")  # the square: the one bucket
        if text:  # MiniLM is masked: padded to the longest caption of the dataset, not to its 512 positions
            assert states.dtype == torch.bfloat16 and mask.dtype == torch.int8
            assert states.shape[1] == mask.sum(1).max() < 40 and key["text_encoder"]
        else:
            assert states is None and "moments@32x32" in shard and key["text_encoder"] is None
        losses = [r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines()) if "loss" in r]
        assert len(losses) == 1 and all(np.isfinite(losses))  # log_every=2: one record


def test_v_prediction_with_zero_terminal_snr_exports_its_schedule(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "v"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "model.prediction_type=v_prediction", "objective.zero_terminal_snr=true",
                  "objective.offset_noise=0.05", "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=2"))  # fmt: skip
    config = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    assert config["rescale_betas_zero_snr"] is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.resolution=36"], "data.resolution=36 is not divisible by 8"),
        (["objective.zero_terminal_snr=true"], "needs model.prediction_type=v_prediction"),
        (["model.prediction_type=sample"], "valid: epsilon, v_prediction"),
        (["model.unet=huge"], "valid: tiny, base, small, coarse-attn"),
        (["model.text_encoder=/nowhere"], "neither minilm, clip-scratch nor an existing folder"),
        (["train.optimizer=prodigy"], "Prodigy finds the LR itself and train.lr scales it; set train.lr=1.0"),
        (["train.optimizer=schedule_free_adamw"], "it needs no schedule (it warms up over train.lr_warmup_steps itself)"),
        (["train.optimizer=schedule_free_adamw", "train.lr_schedule=constant"], "set train.ema_decay=null and train.ema.kind=decay"),
        (["eval.keep_best=true"], "eval.keep_best=true needs eval.every > 0"),
        (["eval.every=2", "data.eval_split=null"], "eval.every=2 scores held-out images: set data.eval_split"),
        (["eval.every=2", "data.eval_split=validation"], "has no 'validation' split (data.eval_split) to score"),
    ],
)
def test_bad_settings_fail_before_training(openmoji_small, tiny_vae, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "x", *overrides))
    assert message in str(err.value)
    assert not (tmp_path / "x" / "latent-cache").exists()  # nothing was encoded


def _adamw_8bit_fails() -> str | None:
    """Why bitsandbytes' AdamW8bit cannot take a step on the device a run trains on here, or None where it can: asked
    here, not of training/run/optim.py, so that a wrong answer there fails the test below."""
    try:
        import bitsandbytes as bnb

        probe = torch.zeros(4096, device="cuda" if torch.cuda.is_available() else "cpu", requires_grad=True)
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:  # not installed, or no kernel for this device
        return f"{type(err).__name__}: {err}"
    return None


def test_adamw_8bit_is_refused_where_bitsandbytes_does_not_run_and_trains_with_8_bit_states_where_it_does(openmoji_small, tiny_vae,
                                                                                                           tmp_path):  # fmt: skip
    out = tmp_path / "8bit"
    settings = (openmoji_small, tiny_vae, out, "train.optimizer=adamw_8bit", "train.max_steps=2", *FAST_STEPS)
    if _adamw_8bit_fails():
        with pytest.raises(ValueError, match=r"train.optimizer=adamw_8bit needs bitsandbytes running on this machine \(.+\); "
                                             r"pip install bitsandbytes on a CUDA machine"):  # fmt: skip
            train(ldm_cfg(*settings))
        if _adamw_8bit_fails().startswith("ModuleNotFoundError"):
            assert not (out / "latent-cache").exists()  # refused before any work
        return
    train(ldm_cfg(*settings))
    def tensors(state) -> list:  # bitsandbytes nests its quantized state a level down
        return [t for v in state.values() for t in ([v] if isinstance(v, torch.Tensor) else tensors(v) if isinstance(v, dict) else [])]

    saved = tensors(torch.load(out / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=True)["state"])
    assert any(t.dtype == torch.uint8 for t in saved)  # the moments are stored in 8 bits
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and np.isfinite(losses).all() and all(v.isfinite().all() for v in unet_weights(out).values())


def test_a_vae_path_that_is_not_an_autoencoder_is_named(openmoji_small, tiny_vae, tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not an AutoencoderKL"):
        train(ldm_cfg(openmoji_small, tmp_path / "unet", tmp_path / "x"))


def test_channel_and_width_mismatches_are_named():
    from ldm.text import build_clip_text_encoder
    from ldm.unet import build_unet

    vae, text = build_autoencoder("tiny", 32), build_clip_text_encoder("tiny")
    with pytest.raises(ValueError, match="takes 8 input channels but the autoencoder vae/ makes 4-channel latents"):
        check_compatible(build_unet("tiny", 8, 32, latent_channels=8), vae, text, 32, "vae/")
    with pytest.raises(ValueError, match="cross_attention_dim is 64 but the text encoder's hidden size is 32"):
        check_compatible(build_unet("tiny", 8, 64), vae, text, 32, "vae/")


def test_two_processes_encode_the_cache_between_them_byte_identical_to_one_even_when_killed_and_relaunched(openmoji_small, tiny_vae, tmp_path):
    """160 images in 4 shards of 40: with two processes each encodes two, and every shard file,
    key and completion record equals the one-process encode's byte for byte. The two-process run
    is first killed (SIGKILL to the launcher and both ranks) once each rank has written a shard,
    then relaunched: it encodes only the missing shards and ends with the same cache. One thread
    per process in both runs: on a CPU, oneDNN picks its convolution kernels by thread count, which
    moves the last bits (2 threads vs 1 measured here); a GPU per process is the same setting throughout."""
    accelerate = Path(sys.executable).parent / "accelerate"
    common = ["--config", str(TINY_LDM_CONFIG), f"data.path={openmoji_small}", f"model.vae={tiny_vae}", "train.max_steps=1",
              "train.checkpoint_every=1", "train.sample_every=100", "cache.shard_size=40", "train.mixed_precision=fp32",
              "train.cpu_threads=1", "model.check_images=0"]  # fmt: skip

    def launch(n, script=("-m", "training.train_ldm"), **popen):
        cmd = [str(accelerate), "launch", *(["--multi_gpu"] if n > 1 else []), "--num_processes", str(n), *script, *common,
               f"output_dir={tmp_path / f'run{n}'}", f"cache.dir={tmp_path / f'cache{n}'}", f"train.batch_size={8 // n}"]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)

    def finish(proc):
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]

    finish(launch(1))
    killed = launch(2, ("tests/slow_encode.py",))  # each shard takes a second longer
    shards = lambda: list((tmp_path / "cache2").glob("*/shard-*.safetensors"))  # noqa: E731
    deadline = time.time() + 120
    while len(shards()) < 2 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    for proc in [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]:  # the ranks too:
        proc.kill()  # torchrun starts them in sessions of their own
    killed.communicate()
    (folder,) = [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]
    assert 2 <= len(shards()) < 4 and not (folder / "complete.json").exists()  # killed mid-encode
    finish(launch(2))
    (one,), (two,) = ([p for p in (tmp_path / f"cache{n}").iterdir() if p.is_dir()] for n in (1, 2))
    files = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir()}  # noqa: E731  (no temporary file left either)
    assert one.name == two.name and files(one) == files(two)
    assert sorted(n for n in files(one) if n.startswith("shard-")) == [f"shard-{k:05d}.safetensors" for k in range(4)]


def test_stage_2_caches_each_image_at_its_bucket_resumes_exactly_and_samples_each_shape(mixed_shapes, tiny_vae, tmp_path):
    """MiniLM (frozen: its caption states are cached per bucket too) and random flips. Killed after
    step 3 and relaunched: the same U-Net, bit for bit, as a run that never stopped."""
    from safetensors import safe_open

    from tests.conftest import fresh_state, ldm_cfg, unet_weights
    from training.train_ldm import train as train_job

    train = fresh_state(train_job)

    on = ["data.buckets.enabled=true", "data.random_flip=true", "model.text_encoder=minilm", "train.max_steps=6",
          "train.checkpoint_every=3", "train.sample_every=6", f"cache.dir={tmp_path / 'cache'}", "cache.shard_size=20"]  # fmt: skip
    train(ldm_cfg(mixed_shapes, tiny_vae, tmp_path / "full", *on))
    train(ldm_cfg(mixed_shapes, tiny_vae, tmp_path / "resumed", *on), stop_after_steps=3)
    train(ldm_cfg(mixed_shapes, tiny_vae, tmp_path / "resumed", *on))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    # the cache: each image's latent at its bucket's shape (tiny autoencoder: f=4; x2 U-Net: buckets in steps of 8)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert json.loads((folder / "key.json").read_text())["buckets"] == ["64x16", "40x24", "32x32", "24x40", "16x64"]
    rows = Counter()
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                tensor, size = name.split("@")
                h, w = map(int, size.split("x"))
                shape = f.get_slice(name).get_shape()
                if tensor in ("moments", "moments_flipped"):
                    assert shape[2:] == [h // 4, w // 4], (name, shape)
                if tensor == "index":
                    rows[size] += shape[0]
                    assert all(i % 3 == {"64x16": 0, "32x32": 1, "16x64": 2}[size] for i in f.get_tensor(name).tolist())
    assert rows == {"64x16": 16, "32x32": 16, "16x64": 16}  # every third image is tall, square, wide
    (event,) = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"buckets"' in line]
    assert event["sizes"] == ["64x16", "40x24", "32x32", "24x40", "16x64"] and event["images"] == [16, 0, 16, 0, 16]
    grid = Image.open(tmp_path / "full" / "samples" / "step-00000006.png")  # 2 prompts x (tall, square, wide) x 2 images, cells of 64x64, x2
    assert grid.size == (3 * 2 * 64 * 2, 2 * 64 * 2)


@pytest.mark.parametrize("job", ["train_ldm", "train_autoencoder"])
def test_two_ranks_on_buckets(job, mixed_shapes, tiny_vae, tmp_path):
    """Stage 2, on the flow-matching objective (DDPM's 2 = 1 is the SIGTERM test's): two ranks with batch 4 end with
    the U-Net of one rank with batch 8 and log its losses, every batch from one bucket, each image's caption drawn
    from its two and its tags shuffled and dropped per sample. Stage 1 draws its posterior noise per rank by design (so there only the data stream
    is shared, tested at the sampler), and two ranks train and log the buckets."""
    import sys
    from pathlib import Path

    import numpy as np

    from tests.conftest import TINY_AE_CONFIG, TINY_LDM_CONFIG, run_to_the_end

    accelerate = Path(sys.executable).parent / "accelerate"
    if job == "train_ldm":
        common = ["--config", str(TINY_LDM_CONFIG), f"model.vae={tiny_vae}", f"cache.dir={tmp_path / 'cache'}", "train.sample_every=100",
                  "objective.type=flow", "captions.shuffle_tags=true", "captions.keep_tokens=1", "captions.tag_dropout=0.3"]  # fmt: skip
    else:
        common = ["--config", str(TINY_AE_CONFIG), "train.sample_every=100", "loss.disc_start=2"]
    common += [f"data.path={mixed_shapes}", "data.buckets.enabled=true", "train.max_steps=4", "train.checkpoint_every=4",
               "train.mixed_precision=fp32"]  # fmt: skip  (bf16 would round a batch of 8 differently from two of 4)
    runs = {"one": ["--num_processes", "1"], "two": ["--multi_gpu", "--num_processes", "2"]}
    for name, procs in runs.items() if job == "train_ldm" else [("two", runs["two"])]:
        batch = 8 if name == "one" else 4
        cmd = [str(accelerate), "launch", *procs, "-m", f"training.{job}", *common, f"output_dir={tmp_path / name}", f"train.batch_size={batch}"]
        run_to_the_end(cmd, tmp_path / name)
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2 and [[n for n in r["images"] if n] for r in log if r.get("event") == "buckets"] == [[16, 16, 16]]
    if job == "train_ldm":
        assert max_difference(unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")) < 1e-5
        loss = [[r["loss"] for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines()) if "loss" in r] for n in runs]
        assert len(loss[0]) == 2 and np.allclose(loss[0], loss[1], atol=1e-5)
    else:
        assert (tmp_path / "two" / "vae" / "config.json").is_file() and "g_loss" in [r for r in log if "l1" in r][-1]


def test_the_first_losses_of_a_tiny_fp32_run_are_frozen(noise_images, tiny_vae, tmp_path):
    """A regression pin in diffusers' style: the logged loss of 4 fp32 steps of the tiny U-Net and CLIP on seeded
    noise images. It moves when the objective, the cache, the step's randomness or the initialisation changes (or
    diffusers' UNet2DConditionModel does); the tolerance covers oneDNN's kernels on these machines' CPUs."""
    train(ldm_cfg(noise_images, tiny_vae, tmp_path / "run", *FROZEN_STEPS, "model.check_images=0"))
    frozen = [{"step": 2, "loss": 0.95516}, {"step": 4, "loss": 0.852551}]
    for got, want in zip(logged(tmp_path / "run", "loss"), frozen, strict=True):
        assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_gradient_checkpointing_trains_the_same_losses(noise_images, tiny_vae, tmp_path):
    """train.gradient_checkpointing recomputes each block's forward in the backward: the same losses as without (it
    once failed there, the recomputation running another attention kernel than the forward's)."""
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        train(ldm_cfg(noise_images, tiny_vae, tmp_path / name, *FROZEN_STEPS, "model.check_images=0",
                      f"train.gradient_checkpointing={flag}"))  # fmt: skip
    plain, checkpointed = (logged(tmp_path / name, "loss") for name in ("plain", "checkpointed"))
    assert len(plain) == 2 and [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in checkpointed], abs=1e-6)


def test_a_flow_matching_run_resumes_exactly_exports_a_flow_folder_and_its_fine_tune_keeps_the_objective(openmoji_small, tiny_vae, tmp_path, capsys):
    """objective.type=flow (logit-normal sigmas, shift 3): killed after step 3 and relaunched, the U-Net is
    bit-identical to a run that never stopped; the export's scheduler/ is DPM++ on flow sigmas with the shift,
    diffusers' StableDiffusionPipeline makes the same image from the folder as it is, and flow Euler samples it too. Fine-tuning that folder keeps its objective:
    objective.type=ddpm on it is one line before any training."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from tests.conftest import FAST_STEPS
    from training.config import ConfigError, load_config
    from training.ldm_config import LdmJobConfig

    common = ["objective.type=flow", "objective.shift=3.0", "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=100",
              "model.check_images=0", f"cache.dir={tmp_path / 'cache'}",
              # the default config's LR schedule and export (no EMA); the relaunch at step 3 lands in the decay (steps 3-5)
              "train.lr_schedule=warmup_stable_decay", "train.lr_decay_fraction=0.5", "train.ema_decay=null"]  # fmt: skip
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "full", *common))
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common), stop_after_steps=3)
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    losses = logged(tmp_path / "full", "loss", "lr")
    assert len(losses) == 3 and all(0 < r["loss"] < 10 for r in losses)
    assert [r["lr"] for r in losses] == pytest.approx([1e-3, 1e-3 * (1 - (1 / 3) ** 0.5), 0.0])  # after steps 2, 4, 6

    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "full" / "pipeline", dtype="fp32")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.scheduler.config.prediction_type == "flow_prediction"
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "full" / "pipeline", safety_checker=None, requires_safety_checker=False)
    args = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np"}
    ref = sd(["red apple"], generator=torch.Generator().manual_seed(0), **args).images  # diffusers' own pipeline, as the folder is
    image = pipe(["red apple"], generator=torch.Generator().manual_seed(0), **args).images
    assert image.shape == ref.shape == (1, 32, 32, 3) and np.abs(image - ref).max() < 1e-3 and image.std() > 0.01
    pipe.set_scheduler("euler")  # diffusers' flow Euler with the shift
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert np.isfinite(pipe(["red apple"], generator=torch.Generator().manual_seed(0), **args).images).all()

    def tune(out, *overrides, method="full"):
        return load_config(LdmJobConfig, ROOT / "configs" / "finetune" / f"{method}-openmoji.yaml", [
            f"model.init_from={tmp_path / 'full' / 'pipeline'}", f"data.path={openmoji_small}", f"output_dir={out}",
            "train.max_steps=2", *FAST_STEPS, *overrides])  # fmt: skip

    # the shipped fine-tune configs as the README runs them: the folder's objective and shift, an explicit other one refused
    with pytest.raises(ConfigError, match="objective.type=ddpm: .* was trained with objective.type=flow, which fine-tuning keeps"):
        train(tune(tmp_path / "tuned-ddpm", "objective.type=ddpm"))
    with pytest.raises(ConfigError, match="objective.shift=2.0: .* was trained with shift 3.0"):
        train(tune(tmp_path / "tuned-shift", "objective.shift=2.0"))
    with pytest.raises(ConfigError, match="objective.min_snr_gamma would be ignored: .* this run's is flow"):
        train(tune(tmp_path / "tuned-snr", "objective.min_snr_gamma=1.0"))
    train(tune(tmp_path / "tuned"))  # the folder's flow objective and shift
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "tuned" / "pipeline").scheduler.config.flow_shift == 3.0
    saved = load_config(LdmJobConfig, tmp_path / "tuned" / "config.yaml").objective
    assert (saved.type, saved.shift, saved.timesteps) == ("flow", 3.0, "logit_normal")
    # LoRA on the flow model: its fused export keeps the flow schedule, and the flow folder with the adapters loaded
    # by diffusers' load_lora_weights makes the fused export's image
    train(tune(tmp_path / "lora", "train.lr=0.05", method="lora"))  # a large LR: visible adapters
    fused = LatentDiffusionPipeline.from_pretrained(tmp_path / "lora" / "pipeline", dtype="fp32")
    assert fused.scheduler.config.use_flow_sigmas and fused.scheduler.config.flow_shift == 3.0
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "full" / "pipeline", dtype="fp32")
    loaded.load_lora_weights(str(tmp_path / "lora" / "lora"))
    lora_image = loaded(["red apple"], generator=torch.Generator().manual_seed(0), **args).images
    assert np.abs(lora_image - fused(["red apple"], generator=torch.Generator().manual_seed(0), **args).images).max() < 1e-3
    assert np.abs(lora_image - image).max() > 1e-3  # the adapters changed the image


@pytest.mark.parametrize("optimizer,overrides", [
    ("adafactor", []),
    ("prodigy", ["train.lr=1.0"]),
    ("schedule_free_adamw", ["train.lr_schedule=constant", "train.ema_decay=null"]),
])  # fmt: skip
def test_each_optimizer_resumes_exactly(optimizer, overrides, openmoji_small, tiny_vae, tmp_path):
    """train.optimizer from the library that owns it: killed after step 3 and relaunched, the run ends with the U-Net
    (for schedule-free its averaged export) of a run that never stopped, and trained (not the initial weights). The run
    that never stopped also draws sample grids every 2 steps, which swap a schedule-free average in and out: no trace."""
    common = [f"train.optimizer={optimizer}", "train.max_steps=6", "train.checkpoint_every=3", f"cache.dir={tmp_path / 'cache'}", *overrides]
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "full", *common, "train.sample_every=2"))
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common), stop_after_steps=3)
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    state = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert max_difference({k: state[f"unet.{k}"] for k in full}, full) > 0  # steps 4-6 moved the weights


def test_validation_loss_is_the_same_at_every_launch_and_keep_best_exports_the_weights_of_its_lowest(openmoji_small, tiny_vae, tmp_path):
    """eval.every=2 on the held-out split (fixed levels, noise and posterior draw): a run killed after step 4 and
    relaunched logs the validation losses of one that never stopped, keeps the same best step and weights, and exports
    them to best/ beside the last; the best kept is the step with the lowest logged loss, and its weights are that
    step's checkpointed U-Net (no EMA)."""
    common = ["eval.every=2", "eval.val_images=12", "eval.keep_best=true", "train.ema_decay=null", "train.checkpoint_every=2", "train.keep_checkpoints=5",
              "train.max_steps=6", "train.sample_every=100", "model.check_images=0", f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "full", *common))
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common), stop_after_steps=4)
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "resumed", *common))
    val = {name: logged(tmp_path / name, "val_loss") for name in ("full", "resumed")}
    assert [r["step"] for r in val["full"]] == [2, 4, 6] and val["full"] == val["resumed"]
    best = json.loads((tmp_path / "full" / "best" / "best.json").read_text())
    assert best == json.loads((tmp_path / "resumed" / "best" / "best.json").read_text())
    assert best == min(val["full"], key=lambda r: r["val_loss"])
    kept = load_file(str(tmp_path / "full" / "checkpoints" / f"step-{best['step']:08d}" / "model.safetensors"))
    exported = unet_weights(tmp_path / "full" / "best")
    assert max_difference({k: kept[f"unet.{k}"] for k in exported}, exported) == 0
    assert json.loads((tmp_path / "full" / "best" / "metrics.json").read_text())["best"] == best
    assert same_weights(unet_weights(tmp_path / "full" / "best"), unet_weights(tmp_path / "resumed" / "best"))


def test_keep_best_keeps_the_lowest_not_the_last(openmoji_small, tiny_vae, tmp_path, monkeypatch):
    """With validation losses 0.5, 0.3, 0.4 at steps 2, 4, 6 the export in best/ is step 4's U-Net and the last export
    is step 6's."""
    from training.stage2 import validation

    scripted = iter([0.5, 0.3, 0.4])
    monkeypatch.setattr(validation.ValidationLoss, "__call__", lambda self, *args: next(scripted))
    common = ["eval.every=2", "eval.val_images=4", "eval.keep_best=true", "train.ema_decay=null", *FAST_STEPS, "train.max_steps=6",
              "train.keep_checkpoints=5"]  # fmt: skip
    train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", *common))
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text()) == {"step": 4, "val_loss": 0.3}
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors"))
    best, last = unet_weights(tmp_path / "run" / "best"), unet_weights(tmp_path / "run")
    assert max_difference({k: kept[f"unet.{k}"] for k in best}, best) == 0 and max_difference(best, last) > 0
    assert [r.get("best") for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "val_loss" in r] == [True, True, None]


def test_the_validation_draws_are_the_runs_own_whatever_the_global_random_state(openmoji_small, tiny_vae, tmp_path):
    """The held-out noise, levels and latent draw come from their own seed: two runs whose other work left the global
    RNG elsewhere score on the same draws, and the same weights score the same loss twice."""
    from autoencoder.model import load_autoencoder
    from ldm.objective import FlowObjective
    from ldm.text import build_clip_text_encoder, clip_tokenizer
    from ldm.unet import build_unet
    from training.stage2.validation import ValidationLoss

    cfg = ldm_cfg(openmoji_small, tiny_vae, tmp_path / "x", "eval.every=2", "eval.val_images=4")
    vae = load_autoencoder(tiny_vae)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        draws.append(ValidationLoss(cfg, vae, FlowObjective(), "cpu"))
    assert len(draws[0]) == 4 and torch.equal(draws[0].eps, draws[1].eps) and torch.equal(draws[0].x0, draws[1].x0)
    tokenizer, encoder = clip_tokenizer(), build_clip_text_encoder("tiny")
    unet = build_unet("tiny", 8, encoder.config.hidden_size)
    assert draws[0](unet, tokenizer, encoder) == draws[1](unet, tokenizer, encoder) > 0
