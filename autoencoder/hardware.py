"""What this machine's CPU can really run, probed once, before any oneDNN kernel is built.

Some virtual machines report AMX in ``/proc/cpuinfo`` (and the kernel grants the AMX state),
yet the first AMX instruction (``tilezero``) raises SIGILL, killing the process on its first
bf16 matrix product. We probe a bf16 matmul in a child process; if it dies, oneDNN is capped at
AVX512-BF16 through ``ONEDNN_MAX_CPU_ISA`` (read by oneDNN when it builds its first kernel).
The verdict is cached per boot. Call :func:`configure_cpu` before any tensor work.
"""

from __future__ import annotations

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


@lru_cache(maxsize=1)
def amx_usable() -> bool:
    """True if the CPU advertises AMX and an AMX bf16 matmul really runs here."""
    if platform.system() != "Linux" or "amx_tile" not in _cpu_flags():
        return False
    key, cache = _probe_key(), _cache_file()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return bool(cached["amx_usable"])
    except (OSError, ValueError, KeyError):
        pass
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=300)
    ok = result.returncode == 0
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "amx_usable": ok}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return ok


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
    """Whether bf16 compute is faster than fp32 here: CUDA with bf16, or a CPU with working AMX.

    Measured on AVX512-BF16 without AMX: a bf16 3x3 convolution runs ~1.5x slower than fp32,
    so bf16 only pays off with AMX.
    """
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return amx_usable()
