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


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {"key": _probe_key()}
    return data if data.get("key") == _probe_key() else {"key": _probe_key()}


def _store(name: str, value) -> None:
    """Keep ``value`` for this boot / kernel / torch version in the user's cache folder."""
    data = _read_cache()
    data[name] = value
    cache = _cache_file()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache)
    except OSError:
        pass


def _cached(name: str, compute) -> object:
    """``compute()`` once per boot / kernel / torch version, cached in the user's cache folder."""
    data = _read_cache()
    if name in data:
        return data[name]
    value = compute()
    _store(name, value)
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


# Times the layers that take most of a U-Net's and an autoencoder's time (3x3 convolutions at two
# widths, an attention-sized linear layer) in fp32 and under bf16 autocast, as the training and
# generation code runs them, interleaved over 7 rounds (so a burst of other work hits both alike).
# Prints the median fp32 / bf16 time ratio, its spread, and the share of the CPU the probe got
# (process CPU time / (wall time x threads)): under other load it is well below 1.
_SPEED_PROBE = """
import json, statistics, time, torch
torch.manual_seed(0)
layers = [(torch.nn.Conv2d(128, 128, 3, padding=1), torch.randn(8, 128, 32, 32)),
          (torch.nn.Conv2d(256, 256, 3, padding=1), torch.randn(8, 256, 16, 16)),
          (torch.nn.Linear(512, 512), torch.randn(2048, 512))]
def run(bf16):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for layer, x in layers:
            layer(x)
def timed(bf16):
    wall, cpu = time.perf_counter(), time.process_time()
    run(bf16)
    return time.perf_counter() - wall, time.process_time() - cpu
run(False); run(True)
ratios, shares = [], []
for _ in range(7):
    (w32, c32), (w16, c16) = timed(False), timed(True)
    ratios.append(w32 / w16)
    shares.append((c32 + c16) / ((w32 + w16) * torch.get_num_threads()))
med = statistics.median(ratios)
print(json.dumps({"speedup": med, "spread": (max(ratios) - min(ratios)) / med, "cpu_share": statistics.median(shares)}))
"""
FAST_BF16 = 1.3  # bf16 is used where it measured at least this much faster
_MIN_CPU_SHARE = 0.6  # below: the probe shared the CPU with other work; its verdict is not kept


def _expected_fast() -> bool | None:
    """What the CPU family suggests: AMX that runs, or AMD's AVX512-BF16 (Zen 4: 2.4x measured) is
    fast; Intel's AVX512-BF16 without AMX was measured slower than fp32 (0.67x). None: no guess."""
    flags = _cpu_flags()
    if "amx_bf16" in flags and amx_usable():
        return True
    if "avx512_bf16" in flags:
        try:
            amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        return amd
    return None


def _probe_speed() -> dict:
    configure_cpu()  # measure what this process will really run (oneDNN capped where AMX traps)
    result = subprocess.run([sys.executable, "-c", _SPEED_PROBE], capture_output=True, text=True, timeout=300)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"speedup": 0.0, "spread": 0.0, "cpu_share": 1.0}


@lru_cache(maxsize=1)
def bf16_decision() -> tuple[float, str]:
    """(bf16 speed-up over fp32 on this CPU, how that was decided), for ``auto`` precision.

    ``LDM_CPU_BF16=fast`` / ``slow`` overrides it. Otherwise the probe above runs in a child process
    and its verdict is kept for the boot only if it is trustworthy: taken with the CPU to itself
    (else it is used for this process only and measured again next time), and, where it disagrees
    with what the CPU family suggests, confirmed by a second probe."""
    override = os.environ.get("LDM_CPU_BF16", "").strip().lower()
    if override in ("fast", "slow"):
        return (FAST_BF16 if override == "fast" else 0.0), f"LDM_CPU_BF16={override}"
    if platform.system() != "Linux" or not _cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        return 0.0, "no bf16 units in this CPU"
    cached = _read_cache().get("bf16_probe")
    if cached:
        return cached["speedup"], f"bf16 probe {cached['speedup']:.2f}x (measured earlier this boot)"
    probe = _probe_speed()
    expected = _expected_fast()
    if expected is not None and (probe["speedup"] >= FAST_BF16) != expected:
        probe = _probe_speed()  # disagrees with the CPU family: measure again; the second stands
    trusted = probe["cpu_share"] >= _MIN_CPU_SHARE
    if trusted:
        _store("bf16_probe", probe)
    how = "" if trusted else f"; the CPU was busy (probe got {probe['cpu_share']:.0%} of it): not kept, measured again next run"
    return round(probe["speedup"], 3), f"bf16 probe {probe['speedup']:.2f}x{how}"


def cpu_bf16_speedup() -> float:
    """How many times faster bf16 runs than fp32 on this CPU (:func:`bf16_decision`). With AMX ~3.5x;
    on AVX512-BF16 without AMX ~0.67x on a Xeon VM (AMX trapping, capped) and 2.4x on an AMD EPYC
    VM. 0.0: no bf16 units."""
    return bf16_decision()[0]


_configured = False


PRIMITIVE_CACHE = 4096  # oneDNN kernels kept built (its default, 1024, is too few for many shapes)


def configure_cpu() -> None:
    """Cap oneDNN below AMX where AMX is advertised but traps, and keep more built kernels.
    Idempotent; respects a user's settings.

    oneDNN builds a kernel per layer, direction and input shape, and keeps 1024 of them. Aspect-ratio
    buckets multiply the shapes: stage 1 on 15 buckets at 64 px (f4 autoencoder + LPIPS) rebuilt
    kernels every step, 17.1 vs 19.2 images/s with 4096 kept, and 2.26 vs 1.97 GiB peak memory
    (2-core Xeon VM, benchmarks/bucket_throughput.py's set, 200 steps)."""
    global _configured
    if _configured:
        return
    _configured = True
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE))
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
    return cpu_bf16_speedup() >= FAST_BF16


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
