"""Generation speed: diffusers' StableDiffusionPipeline (fp32, its defaults) vs LatentDiffusionPipeline
(its defaults) on the same weights, sampler, steps, batch and seed, in one process.

    .venv/bin/python benchmarks/generation_speed.py [--resolution 64] [--steps 25] [--batch 4] [--compile] [--student]

The model is tiny but shaped like a real one: a 35M-parameter U-Net (128/256/256 channels, two
cross-attention levels), a 4-layer CLIP text encoder (width 384) with the real CLIP tokenizer and
the f4-small autoencoder, randomly initialised. Prints the seconds per batch (best of --repeats rounds in which the pipelines take turns),
the speed ratio, and the PSNR between the two pipelines' images. ``--student`` also times a few-step consistency
student of the same U-Net (training/distill.py's: a guidance embedding, LCM's sampler, no unconditional pass) at
``--student-steps`` (4): its speed does not depend on its weights, so the untrained copy times what a distilled one does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402

from runtime.hardware import amx_usable  # noqa: E402
import runtime  # noqa: E402
from autoencoder import build_autoencoder, fit_latent_normalization, set_latent_normalization  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.schedulers import make_scheduler  # noqa: E402
from ldm.text import build_clip_text_encoder, clip_tokenizer  # noqa: E402
from ldm.unet import build_unet  # noqa: E402

PROMPTS = ["a red apple", "a smiling cat face", "a blue car", "a yellow star"]


def build_model(folder: Path, resolution: int) -> None:
    torch.manual_seed(0)
    vae = build_autoencoder("f4-small", resolution)
    with torch.no_grad():
        set_latent_normalization(vae, *fit_latent_normalization(vae, [torch.rand(8, 3, resolution, resolution) * 2 - 1]))
    text_encoder = build_clip_text_encoder("small")
    unet = build_unet("small", resolution // 4, text_encoder.config.hidden_size)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    print(f"model: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, "
          f"{resolution}x{resolution} images, {resolution // 4}x{resolution // 4} latents")  # fmt: skip


def build_student(folder: Path, student_folder: Path) -> None:
    """The benchmark model's U-Net as a consistency student would be (training/stage2/student.py): a guidance embedding
    (zero-initialised) and LCM's sampler on the model's schedule."""
    from training.distill_config import DistillConfig
    from training.stage2.student import build_student as student_of, load_teacher

    teacher = load_teacher(str(folder))
    pipe = LatentDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=student_of(teacher, DistillConfig()), scheduler=make_scheduler("lcm", teacher.noise_scheduler.config))  # fmt: skip
    pipe.save_pretrained(student_folder)


def interleaved(pipes: dict, prompts: list[str], steps: dict, repeats: int) -> tuple[dict, dict]:
    """Best-of-``repeats`` seconds per pipeline, the pipelines taking turns in each round (so a slow
    spell of a shared machine hits all of them), after one warm-up call each (the compilation, with
    compile); and each one's images. ``steps``: each pipeline's number of steps."""
    def run(name):
        return pipes[name](prompts, num_inference_steps=steps[name], guidance_scale=7.5 if steps[name] > 8 else 3.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    images = {name: run(name) for name in pipes}
    best = dict.fromkeys(pipes, float("inf"))
    for _ in range(repeats):
        for name in pipes:
            start = time.perf_counter()
            run(name)
            best[name] = min(best[name], time.perf_counter() - start)
    return best, images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    runtime.configure()  # before any kernel is built
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time compile=True (minutes of compilation on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--student", action="store_true", help="also time a consistency student (no unconditional pass)")
    p.add_argument("--student-steps", type=int, default=4)
    args = p.parse_args()
    prompts = (PROMPTS * args.batch)[: args.batch]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"AMX usable: {amx_usable()}, CUDA: {torch.cuda.is_available()}, device: {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""))  # fmt: skip
    print(f"setting: DPM++ 2M, {args.steps} steps, batch {args.batch}, guidance 7.5 (U-Net batch {2 * args.batch})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipeline"
        build_model(folder, args.resolution)

        sd = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False).to(device)
        sd.scheduler = make_scheduler("dpm++", sd.scheduler.config)
        pipes = {"diffusers_fp32": sd}
        variants = {"ours_default": {}, "ours_bf16": {"dtype": "bf16"}}
        if args.compile:
            variants["ours_compile"] = {"compile": True}
        for name, options in variants.items():
            pipes[name] = LatentDiffusionPipeline.from_pretrained(folder, device=device, **options)
            pipes[name].set_scheduler("dpm++")
            results[f"{name}_dtype"] = str(pipes[name].unet.dtype).replace("torch.", "")
        steps = dict.fromkeys(pipes, args.steps)
        if args.student:
            build_student(folder, Path(tmp) / "student")
            name = f"student_{args.student_steps}_steps"
            pipes[name] = LatentDiffusionPipeline.from_pretrained(Path(tmp) / "student", device=device)
            results[f"{name}_dtype"] = str(pipes[name].unet.dtype).replace("torch.", "")
            variants[name], steps[name] = {}, args.student_steps
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        seconds, images = interleaved(pipes, prompts, steps, args.repeats)
        results |= seconds
        reference = images["diffusers_fp32"]

    base = results["diffusers_fp32"]
    print(f"\n{'pipeline':<34}{'s / batch':>10}{'speed-up':>10}{'PSNR vs diffusers':>20}")
    print(f"{'diffusers StableDiffusion, fp32':<34}{base:>10.2f}{1.0:>9.2f}x{'-':>20}")
    for name in variants:
        label = f"{name.replace('_', ' ')} ({results[name + '_dtype']})"
        results[f"{name}_speedup"] = base / results[name]
        if name.startswith("student"):  # another model and sampler: its images are not the reference's
            print(f"{label:<34}{results[name]:>10.2f}{results[name + '_speedup']:>9.2f}x{'-':>20}")
            continue
        results[f"{name}_psnr_db"] = psnr(images[name], reference)
        print(f"{label:<34}{results[name]:>10.2f}{results[name + '_speedup']:>9.2f}x{results[name + '_psnr_db']:>17.1f} dB")
    print(f"\nratio (this pipeline at its defaults / diffusers fp32): {results['ours_default_speedup']:.2f}x, "
          f"PSNR {results['ours_default_psnr_db']:.1f} dB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
