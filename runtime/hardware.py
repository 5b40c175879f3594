"""What this machine's CPU can really run, probed once, before any oneDNN kernel is built; and the
attention kernel training uses on it.

Some virtual machines report AMX in ``/proc/cpuinfo`` (and the kernel grants the AMX state),
yet the first AMX instruction (``tilezero``) raises SIGILL, killing the process on its first
bf16 matrix product. We probe a bf16 matmul in a child process; if it dies, oneDNN is capped at
AVX512-BF16 through ``ONEDNN_MAX_CPU_ISA`` (read by oneDNN when it builds its first kernel).
The verdict is cached per boot. Call :func:`configure_cpu` before any tensor work.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

_PROBE = "import torch; a = torch.ones(64, 64, dtype=torch.bfloat16); print(float((a @ a).sum()))"
_FALLBACK_ISA = "AVX512_CORE_BF16"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "latent-diffusion" / "cpu-probe.json"


def _probe_key() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    import torch

    return f"{boot}|{platform.release()}|{torch.__version__}"


def _cached(name: str, compute) -> object:
    """``compute()`` once per boot / kernel / torch version, cached in the user's cache folder."""
    key, cache = _probe_key(), _cache_file()
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("key") != key:
        data = {"key": key}
    if name in data:
        return data[name]
    data[name] = value = compute()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache)
    except OSError:
        pass
    return value


@lru_cache(maxsize=1)
def amx_usable() -> bool:
    """True if the CPU advertises AMX and an AMX bf16 matmul really runs here."""
    if platform.system() != "Linux" or "amx_tile" not in _cpu_flags():
        return False

    def probe() -> bool:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=300).returncode == 0

    return bool(_cached("amx_usable", probe))


# Times a 3x3 convolution (most of a U-Net's and an autoencoder's time) in fp32 and under bf16
# autocast, as the training and generation code runs them; prints fp32 time / bf16 time.
_SPEED_PROBE = """
import time, torch
torch.manual_seed(0)
conv = torch.nn.Conv2d(128, 128, 3, padding=1)
x = torch.randn(8, 128, 32, 32)
def best(f):
    f()
    times = []
    for _ in range(5):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times)
with torch.no_grad():
    fp32 = best(lambda: conv(x))
    with torch.autocast("cpu", torch.bfloat16):
        bf16 = best(lambda: conv(x))
print(fp32 / bf16)
"""


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 convolution runs than fp32 on this CPU (measured once per boot).

    It depends on more than the flags: with AMX ~3.5x; on AVX512-BF16 without AMX it was measured
    at ~0.67x on a Xeon VM (AMX trapping, capped) and 2.4x on an AMD EPYC VM. 0.0: no bf16 units."""
    flags = _cpu_flags()
    if platform.system() != "Linux" or not flags & {"amx_bf16", "avx512_bf16"}:
        return 0.0

    def probe() -> float:
        configure_cpu()  # measure what this process will really run (oneDNN capped where AMX traps)
        result = subprocess.run([sys.executable, "-c", _SPEED_PROBE], capture_output=True, text=True, timeout=300)
        try:
            return round(float(result.stdout.strip().splitlines()[-1]), 3)
        except (ValueError, IndexError):
            return 0.0

    return float(_cached("bf16_speedup", probe))


_configured = False


def configure_cpu() -> None:
    """Cap oneDNN below AMX where AMX is advertised but traps. Idempotent; respects a user's setting."""
    global _configured
    if _configured:
        return
    _configured = True
    if "ONEDNN_MAX_CPU_ISA" in os.environ or "DNNL_MAX_CPU_ISA" in os.environ:
        return
    if "amx_tile" in _cpu_flags() and not amx_usable():
        os.environ["ONEDNN_MAX_CPU_ISA"] = _FALLBACK_ISA


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 compute is clearly faster than fp32 here: CUDA with bf16, or a CPU on which a
    bf16 convolution measured at least 1.3x faster than fp32 (:func:`cpu_bf16_speedup`)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_speedup() >= 1.3


def training_attention(device) -> contextlib.AbstractContextManager:
    """On a CPU, attention for training through PyTorch's math path (matmul + softmax, whose
    backward is plain matmuls). Measured on a bf16 AMD EPYC VM, base U-Net, batch 64: the CPU
    flash-attention backward took 38% of a bf16 step; with the math path the step went 0.43 -> 0.34 s
    (fp32: 0.50 -> 0.48 s). Generation keeps the flash kernel (there it is the faster one).
    Elsewhere (CUDA) PyTorch's own choice stands."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
