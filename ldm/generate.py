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

import runtime
from runtime.errors import InputError, one_line_errors

from .schedulers import SCHEDULERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (diffusers layout)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm++")
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        canvas.paste(im, ((i % columns) * w, (i // columns) * h))
    return canvas


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    runtime.configure()
    with one_line_errors():  # a refused folder (pickle weights, foreign code), a bad setting, an unwritable --out
        return generate(args)


def generate(args: argparse.Namespace) -> list[Path]:
    from .pipeline import LatentDiffusionPipeline  # after argument errors: the import takes seconds

    if args.out.suffix.lower() == ".png" and not args.grid:
        raise SystemExit(f"--out {args.out}: a .png file needs --grid; without it --out is a folder")
    if args.init_image is not None and not args.init_image.is_file():
        raise SystemExit(f"--init-image {args.init_image} does not exist")
    if not Path(args.model, "model_index.json").is_file():
        raise SystemExit(f"--model {args.model} is not a pipeline folder (no model_index.json)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=args.dtype, device=device, compile=args.compile)
    pipe.set_scheduler(args.scheduler)
    if args.lora is not None:
        if not (args.lora / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit(f"--lora {args.lora} has no pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(str(args.lora))

    n = len(args.prompt) * args.num_images
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(n)]
    init = Image.open(args.init_image) if args.init_image else None
    try:
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images,
            generator=generators,
            image=init,
            strength=args.strength,
            cross_attention_kwargs={"scale": args.lora_scale} if args.lora is not None else None,
            output_type="pil",
        ).images
    except ValueError as e:  # the pipeline's input checks (and diffusers' own): say what is wrong, without a traceback
        raise InputError(str(e)) from None

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
            im.save(path)
            written.append(path)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
