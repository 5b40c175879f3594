"""Stage 2 and generation: text conditioning, the latent U-Net, samplers and the pipeline.

``from ldm import LatentDiffusionPipeline`` is resolved lazily, so training code that needs only
the diffusion math does not import the pipeline machinery.
"""

_LAZY = {"LatentDiffusionPipeline": "ldm.pipeline", "LatentDiffusionXLPipeline": "ldm.sdxl"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute '{name}'")


__all__ = ["LatentDiffusionPipeline", "LatentDiffusionXLPipeline"]
