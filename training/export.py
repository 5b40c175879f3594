"""Exports for the tools people generate in.

    python -m training.export single-file --model runs/my-finetune/pipeline --out my-model.safetensors [--dtype fp16]

``single-file``: a Stable-Diffusion-layout pipeline folder (SD 1.x: a CLIP text encoder; a fine-tune of one exports
such a folder) as one safetensors file in the original key layout, what AUTOMATIC1111 and ComfyUI load
(``ldm/single_file.py``). LoRA needs no command: every LoRA run of an SD-layout model writes
``lora/lora_kohya.safetensors`` beside the diffusers-format file.
"""

from __future__ import annotations

import argparse

import torch

from ldm.single_file import save_single_file
from runtime.errors import one_line_errors

DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    single = commands.add_parser("single-file", help="a pipeline folder as one SD-layout safetensors file")
    single.add_argument("--model", required=True, help="a pipeline folder (diffusers layout, SD 1.x components)")
    single.add_argument("--out", required=True, help="the .safetensors file to write")
    single.add_argument("--dtype", choices=list(DTYPES), default="keep", help="keep: the folder's own")
    args = parser.parse_args(argv)
    with one_line_errors():
        out = save_single_file(args.model, args.out, DTYPES[args.dtype])
        print(f"saved {out}")


if __name__ == "__main__":
    main()
