"""What the machine decides, not the model: the CPU probe and thread-independent settings, the
attention kernel for training, atomic file and folder writes, image helpers. Every package may
import it; it imports none of them.

Entry points (the training jobs, ``ldm.generate``, ``training.evaluate``, ``training.prepare_data``,
``LatentDiffusionPipeline.from_pretrained``, the test session) call :func:`configure` once, before
any tensor work: nothing is configured as a side effect of an import.
"""

from .hardware import configure_cpu as configure
from .hardware import cpu_bf16_speedup, fast_bf16, training_attention
from .narrow_maps import NARROW_MAP, bf16_narrow_maps_ok, bf16_narrow_refusal, bf16_wrong_sizes

__all__ = [
    "NARROW_MAP",
    "bf16_narrow_maps_ok",
    "bf16_narrow_refusal",
    "bf16_wrong_sizes",
    "configure",
    "cpu_bf16_speedup",
    "fast_bf16",
    "training_attention",
]
