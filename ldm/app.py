"""A web page to generate with any pipeline folder (gradio).

    python -m ldm.app --model runs/ldm-openmoji-32/pipeline [--lora runs/sks/lora] [--port 7860]

Then open http://127.0.0.1:7860. Prompt, negative prompt, steps, guidance, seed (or a random
one), sampler, number of images, size, the LoRA's scale when one is loaded, and an optional
starting image with its strength (img2img; resized to the chosen size). The images are those
``ldm.generate`` makes with the same settings and seed; each downloads as a PNG with its settings in it. It listens on 127.0.0.1
only, unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

import runtime
from runtime.errors import InputError, one_line_errors

from .generate import generation_defaults, load_pipeline, png_info, sample
from .schedulers import sampler_names

MAX_SEED = 2**31 - 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (diffusers layout)")
    p.add_argument("--lora", type=Path, default=None, help="a folder with pytorch_lora_weights.safetensors (diffusers format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network this machine is on)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where it is faster")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def _whole(value, name: str) -> int:
    """A whole number from a page field (an emptied field is None), or an InputError naming the field."""
    if value is None or float(value) != int(value):
        raise InputError(f"{name}: give a whole number, got {value!r}")
    return int(value)


def build_app(pipe, has_lora: bool = False, title: str | None = None):
    """The page for a loaded pipeline (a ``gradio.Blocks``; ``.launch()`` serves it)."""
    import gradio as gr

    size = pipe.default_resolution
    defaults = generation_defaults(pipe.name_or_path or "")  # the folder's sampling.json, else 25 / 7.5 / dpm++
    out_dir = Path(tempfile.mkdtemp(prefix="ldm-app-"))

    def generate(
        prompt,
        negative,
        steps,
        guidance,
        seed,
        random_seed,
        sampler,
        num_images,
        height,
        width,
        lora_scale,
        init,
        strength,
        progress=gr.Progress(track_tqdm=True),
    ):
        try:
            seed = random.randint(0, MAX_SEED) if random_seed else _whole(seed, "Seed")
            steps, num_images, height, width = (
                _whole(v, name) for v, name in ((steps, "Steps"), (num_images, "Images"), (height, "Height"), (width, "Width"))
            )
            if not prompt or not prompt.strip():
                raise InputError("write a prompt first")
            if init is not None and init.size != (width, height):  # as other Stable Diffusion pages do
                init = init.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            images = sample(
                pipe,
                [prompt],
                negative_prompt=negative or None,
                num_images=num_images,
                steps=steps,
                guidance=float(guidance),
                seed=seed,
                scheduler=sampler,
                height=height,
                width=width,
                init_image=init,
                strength=float(strength),
                lora_scale=float(lora_scale) if has_lora else None,
            )
        except InputError as err:  # a setting that does not fit: said in the page
            raise gr.Error(str(err), print_exception=False) from None
        folder = Path(tempfile.mkdtemp(dir=out_dir))
        files = []
        for i, im in enumerate(images):
            path = folder / f"{seed + i:010d}.png"
            im.save(path, pnginfo=png_info(im.info["parameters"]))
            files.append((str(path), f"seed {seed + i}"))
        return files, seed

    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    with gr.Blocks(
        title=title or "latent diffusion", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:  # hour-old files go
        gr.Markdown(f"### {title or 'latent diffusion'}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red apple")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(1, 150, value=defaults["steps"], step=1, label="Steps")
                    guidance = gr.Slider(0.0, 20.0, value=defaults["guidance"], step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed")
                with gr.Row():
                    sampler = gr.Dropdown(sampler_names(pipe.scheduler.config), value=defaults["scheduler"], label="Sampler")
                    num_images = gr.Slider(1, 16, value=4, step=1, label="Images", elem_id="num-images")
                with gr.Row():
                    height = gr.Number(value=size, precision=0, label="Height", elem_id="height")
                    width = gr.Number(value=size, precision=0, label="Width", elem_id="width")
                lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale", visible=has_lora)
                with gr.Accordion("Start from an image (img2img)", open=False):
                    init = gr.Image(type="pil", label="Starting image", image_mode="RGB")
                    strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Strength (1 ignores the image)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=1):
                gallery = gr.Gallery(
                    label="Images", columns=4, format="png", buttons=["download", "fullscreen"], elem_id="gallery"
                )
                used_seed = gr.Number(label="Seed used", interactive=False, precision=0)
        settings = [prompt, negative, steps, guidance, seed, random_seed, sampler, num_images, height, width, lora_scale]
        button.click(generate, [*settings, init, strength], [gallery, used_seed])  # in generate()'s order
    app.out_dir = out_dir
    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    runtime.configure()
    with one_line_errors():
        try:
            import gradio  # noqa: F401
        except ModuleNotFoundError:
            raise InputError(
                "the web page needs gradio: pip install 'latent-diffusion-lab[app]' (or pip install gradio)"
            ) from None
        pipe = load_pipeline(args.model, args.lora, args.dtype, args.device)
        app = build_app(
            pipe, has_lora=args.lora is not None, title=f"latent diffusion: {'/'.join(Path(args.model).resolve().parts[-2:])}"
        )
        print(f"serving {args.model} on http://{args.host}:{args.port}", flush=True)
        app.queue().launch(server_name=args.host, server_port=args.port, show_error=False, allowed_paths=[str(app.out_dir)])


if __name__ == "__main__":
    main(sys.argv[1:])
