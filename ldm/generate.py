"""Generate images from a pipeline folder.

    python -m ldm.generate --model runs/ldm-openmoji-32/pipeline --prompt "a red apple" --num-images 4 --out out/

Image ``k`` of prompt ``p`` uses the seed ``seed + p * num_images + k``, so an image is the same
whether it is generated alone or in a batch, and the same command gives the same files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import runtime
from runtime.errors import InputError, one_line_errors

from .folders import check_pipeline_folder, sampling_defaults
from .schedulers import SCHEDULERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (diffusers layout)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="default: the folder's sampling.json, else 25")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (<= 1: off); default: the folder's sampling.json, else 7.5",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help="default: the folder's sampling.json, else dpm++")
    p.add_argument("--height", type=int, default=None, help="default: the model's training resolution")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: 1 ignores the image, towards 0 keeps it")
    p.add_argument("--lora", type=Path, default=None, help="a folder with pytorch_lora_weights.safetensors (diffusers format)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="how much of the LoRA to apply (0: none, 1: as trained)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where it is faster")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow first call)")
    p.add_argument("--grid", action="store_true", help="one grid PNG (a row per prompt) instead of one PNG per image")
    p.add_argument("--out", type=Path, required=True, help="output folder (or a .png file with --grid)")
    return p.parse_args(argv)


GENERATION_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "dpm++"}  # a folder's sampling.json overrides them


def generation_defaults(folder: str | Path) -> dict:
    """Steps, guidance and sampler for a pipeline folder: its sampling.json (a stage-2 run's sample settings, a
    few-step student's own), or 25 / 7.5 / dpm++ (Stable Diffusion's) for a folder without one."""
    return {**GENERATION_DEFAULTS, **sampling_defaults(folder)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        canvas.paste(im, ((i % columns) * w, (i // columns) * h))
    return canvas


def sample(
    pipe,
    prompts: list[str],
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    scheduler: str = "dpm++",
    height: int | None = None,
    width: int | None = None,
    init_image: Image.Image | None = None,
    strength: float = 0.8,
    lora_scale: float | None = None,
) -> list[Image.Image]:
    """The images of ``prompts`` (``num_images`` each) from a loaded pipeline, as this command and
    the web page (``ldm.app``) make them: image ``k`` of prompt ``p`` from the seed
    ``seed + p * num_images + k``. Each image's ``info["parameters"]`` holds its settings (the
    text that :func:`png_info` writes into its PNG). A setting that does not fit raises InputError."""
    pipe.set_scheduler(scheduler)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * num_images)]
    try:
        images = pipe(
            prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            num_images_per_prompt=num_images,
            generator=generators,
            image=init_image,
            strength=strength,
            cross_attention_kwargs={"scale": lora_scale} if lora_scale is not None else None,
            output_type="pil",
        ).images
    except ValueError as e:  # the pipeline's input checks (and diffusers' own): say what is wrong, without a traceback
        raise InputError(str(e)) from None
    for i, im in enumerate(images):
        settings = [
            f"Steps: {steps}",
            f"Sampler: {scheduler}",
            f"CFG scale: {guidance}",
            f"Seed: {seed + i}",
            f"Size: {im.width}x{im.height}",
            f"Model: {Path(str(pipe.name_or_path or 'pipeline')).name}",
        ]
        if init_image is not None:
            settings.append(f"Denoising strength: {strength}")
        if lora_scale is not None:
            settings.append(f"LoRA scale: {lora_scale}")
        negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
        im.info["parameters"] = f"{prompts[i // num_images]}{negative}\n{', '.join(settings)}"
    return images


def png_info(parameters: str) -> PngInfo:
    """A PNG text chunk ``parameters`` with an image's settings (the key and layout other Stable
    Diffusion tools write and read)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    runtime.configure()
    with one_line_errors():  # a refused folder (pickle weights, foreign code), a bad setting, an unwritable --out
        return generate(args)


def load_pipeline(
    model: str | Path, lora: Path | None = None, dtype: str = "auto", device: str | None = None, compile: bool = False
):
    """The pipeline folder ``model`` (refused if it would run code) on ``device`` (default: CUDA if
    there is one), with the LoRA folder ``lora`` loaded: what this command and the web page generate with."""
    check_pipeline_folder(model)  # refused before the seconds the import below takes
    from .pipeline import LatentDiffusionPipeline  # after argument errors: the import takes seconds

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(model, dtype=dtype, device=device, compile=compile)
    if lora is not None:
        if not (Path(lora) / "pytorch_lora_weights.safetensors").is_file():
            raise InputError(f"--lora {lora} has no pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(str(lora))
    return pipe


def generate(args: argparse.Namespace) -> list[Path]:
    if args.out.suffix.lower() == ".png" and not args.grid:
        raise InputError(f"--out {args.out}: a .png file needs --grid; without it --out is a folder")
    if args.init_image is not None and not args.init_image.is_file():
        raise InputError(f"--init-image {args.init_image} does not exist")
    pipe = load_pipeline(args.model, args.lora, args.dtype, args.device, args.compile)
    defaults = generation_defaults(args.model)
    steps, guidance, scheduler = (v if v is not None else defaults[k] for k, v in
                                  (("steps", args.steps), ("guidance", args.guidance), ("scheduler", args.scheduler)))  # fmt: skip

    init = Image.open(args.init_image) if args.init_image else None
    images = sample(
        pipe,
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        scheduler=scheduler,
        height=args.height,
        width=args.width,
        init_image=init,
        strength=args.strength,
        lora_scale=args.lora_scale if args.lora is not None else None,
    )

    if args.grid:
        path = args.out if args.out.suffix.lower() == ".png" else args.out / "grid.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid(images, args.num_images).save(path)
        written = [path]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, im in enumerate(images):
            p, k = divmod(i, args.num_images)
            path = args.out / f"{args.seed + i:06d}-{_slug(args.prompt[p])}-{k}.png"
            im.save(path, pnginfo=png_info(im.info["parameters"]))
            written.append(path)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
