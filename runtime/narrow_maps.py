"""bf16 convolutions that come out wrong on narrow maps on some CPUs: the probe, the sizes it rules
out, and the one wording of the refusal the training jobs and the pipeline give."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache

from .hardware import _cached, _cpu_flags, configure_cpu

# bf16 stride-2 convolutions on maps 1 to 3 pixels wide or high, against fp32, after filling freed
# memory with NaN (the faulty kernels read memory they did not write). Exits 1 if any result is off.
_NARROW_PROBE = """
import sys, torch
torch.manual_seed(0)
bad = 0
cases = [(shape, padding) for side, padding in ((1, 1), (2, 1), (3, 1), (3, 0)) for shape in ((8, side), (side, 8))]
for shape, padding in cases:
    conv = torch.nn.Conv2d(64, 64, 3, stride=2, padding=padding)
    x = torch.randn(16, 64, *shape)
    with torch.no_grad():
        ref = conv(x)
        for _ in range(3):
            junk = [torch.full((1 << 20,), float("nan")) for _ in range(64)]
            del junk
            with torch.autocast("cpu", torch.bfloat16):
                out = conv(x).float()
            bad += not bool(torch.isfinite(out).all()) or (out - ref).abs().max().item() > 0.2
sys.exit(1 if bad else 0)
"""
NARROW_MAP = 4  # the narrowest map a stride-2 convolution may get where bf16_narrow_maps_ok() is False


@lru_cache(maxsize=1)
def bf16_narrow_maps_ok() -> bool:
    """Whether bf16 convolutions with stride 2 compute what fp32 does on maps narrower than
    :data:`NARROW_MAP` pixels. On a Xeon VM with AMX (torch 2.13's oneDNN) they do not: a 3x3,
    stride-2 convolution of an 8x2 map read memory it had not written (NaN, or errors of ~2.6),
    which a U-Net meets at a 4:1 bucket of a small model. Capped below AMX they were right (the
    verdict is kept per ISA cap).
    Probed once per boot in a child process (after :func:`configure_cpu`)."""
    if platform.system() != "Linux" or not _cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        return True  # no bf16 units: bf16 is never chosen on this CPU

    def probe() -> bool:
        return subprocess.run([sys.executable, "-c", _NARROW_PROBE], capture_output=True, timeout=300).returncode == 0

    configure_cpu()  # the verdict holds for the kernels this process runs: one per oneDNN ISA cap
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "uncapped"
    return bool(_cached(f"bf16_narrow_maps_ok|{cap}", probe))


def bf16_wrong_sizes(sizes, downsampling: int) -> list:
    """Of ``sizes`` ((height, width) images), those bf16 would compute wrongly on this CPU: the ones
    whose narrower side reaches a model's last downsampling convolution (its input is the image
    shrunk by ``downsampling / 2``) under :data:`NARROW_MAP` pixels, where :func:`bf16_narrow_maps_ok`
    is False. Empty elsewhere (the probe runs only when a size is that narrow)."""
    narrow = [tuple(s) for s in sizes if _last_map_width(s, downsampling) < NARROW_MAP]
    return narrow if narrow and not bf16_narrow_maps_ok() else []


def _last_map_width(size, downsampling: int) -> int:
    """The narrower side of the map a (height, width) image leaves at a model's last downsampling convolution."""
    return min(size) * 2 // downsampling


def bf16_narrow_refusal(sizes, downsampling: int, model: str, fixes: str) -> str | None:
    """Why bf16 cannot run ``sizes`` on this CPU (:func:`bf16_wrong_sizes`), ending in ``fixes`` (what the caller's user
    can change), or None when it can: the one wording of the refusal, for the training jobs and the pipeline."""
    narrow = bf16_wrong_sizes(sizes, downsampling)
    if not narrow:
        return None
    names = ", ".join(f"{h}x{w}" for h, w in narrow)
    width = min(_last_map_width(s, downsampling) for s in narrow)
    return (
        f"{names} (height x width) would give maps {width} pixels wide at "
        f"{model}'s last downsampling convolution, and bf16 convolutions of maps narrower than {NARROW_MAP} come out wrong "
        f"on this CPU (oneDNN; probed); use sides of at least {2 * downsampling}{fixes}"
    )
