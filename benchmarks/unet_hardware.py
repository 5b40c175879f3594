"""Hardware use: the U-Net forward's achieved FLOP/s as a fraction of the machine's measured matrix
product rate, in fp32 and bf16, and where its time goes.

    .venv/bin/python benchmarks/unet_hardware.py [--no-compile] [--json out.json]

The U-Net is the generation benchmark's (35.5M parameters, 4x16x16 latents, batch 8 = 4 images with
guidance, 77 text tokens of width 384). FLOPs come from torch.utils.flop_counter (attention counted
through the math path). The matrix-product rate is the best of 2048x2048 products. A torch.profiler
run of the bf16 forward splits its time into convolution, matrix products, attention, norms,
elementwise ops and copies.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_speed import build_model  # noqa: E402
import runtime  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from timing import median_seconds  # noqa: E402

CATEGORIES = {  # profiler op name -> category (self time)
    "convolution": ("convolution", "conv"),
    "matrix products": ("addmm", "aten::mm", "bmm", "baddbmm"),
    "attention": ("scaled_dot_product", "attention", "softmax"),
    "norms": ("group_norm", "layer_norm"),
    "copies, layout": ("copy_", "_to_copy", "clone", "contiguous", "cat", "empty", "view", "reshape", "transpose", "permute", "as_strided", "chunk", "split", "slice"),
}


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "elementwise, other"


def profile_split(fn) -> dict[str, float]:
    with torch.no_grad(), torch.profiler.profile() as prof:
        for _ in range(3):
            fn()
    split: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            split[category(event.key)] = split.get(category(event.key), 0.0) + event.self_cpu_time_total
    total = sum(split.values())
    return {k: round(v / total, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def main() -> None:
    runtime.configure()  # before any kernel is built
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant (~20 s of compilation)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp()) / "pipeline"
    build_model(folder, 64)  # the generation benchmark's model
    unet = LatentDiffusionPipeline.from_pretrained(folder, dtype="fp32").unet
    x, t, states = torch.randn(8, 4, 16, 16), torch.tensor(500), torch.randn(8, 77, 384)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=states)
    res: dict = {"gflop_per_forward": counter.get_total_flops() / 1e9,
                 "matmul_gflops": {"fp32": matmul_rate(torch.float32) / 1e9, "bf16": matmul_rate(torch.bfloat16) / 1e9}}  # fmt: skip

    variants = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}}
    if not args.no_compile:
        variants["bf16 compiled"] = {"dtype": "bf16", "compile": True}
    res["forward"] = {}
    for name, options in variants.items():
        pipe = LatentDiffusionPipeline.from_pretrained(folder, **options)  # the pipeline's own set-up of its U-Net
        run = functools.partial(pipe.unet, x.to(pipe.unet.dtype), t, encoder_hidden_states=states.to(pipe.unet.dtype), return_dict=False)
        seconds = median_seconds(run, repeats=15, warmup=3)
        rate = res["gflop_per_forward"] / seconds
        res["forward"][name] = {"ms": round(seconds * 1e3, 1), "gflops": round(rate, 1),
                                "of_bf16_matmul": round(rate / res["matmul_gflops"]["bf16"], 3),
                                "of_fp32_matmul": round(rate / res["matmul_gflops"]["fp32"], 3)}  # fmt: skip
        if name == "bf16":
            res["bf16_time_split"] = profile_split(run)
    shutil.rmtree(folder.parent)
    print(f"U-Net forward: {res['gflop_per_forward']:.1f} GFLOP; matrix product rate fp32 {res['matmul_gflops']['fp32']:.0f}, "
          f"bf16 {res['matmul_gflops']['bf16']:.0f} GFLOP/s")  # fmt: skip
    print(f"{'':<16}{'ms':>8}{'GFLOP/s':>9}{'of bf16 mm':>12}{'of fp32 mm':>12}")
    for name, r in res["forward"].items():
        print(f"{name:<16}{r['ms']:>8.1f}{r['gflops']:>9.0f}{r['of_bf16_matmul']:>12.0%}{r['of_fp32_matmul']:>12.0%}")
    print("bf16 forward time: " + ", ".join(f"{k} {v:.0%}" for k, v in res["bf16_time_split"].items()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
