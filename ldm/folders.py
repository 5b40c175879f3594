"""Pipeline folders as diffusers lays them out, opened safely: nothing in a folder runs code, and the
dtype a user names is resolved once."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime import fast_bf16
from runtime.errors import InputError
from runtime.files import write_json_atomic

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
# Libraries a pipeline folder may name for its components. Anything else (a module name that
# diffusers would import from a .py file inside the folder) is refused: loading runs no code.
_TRUSTED_LIBRARIES = ("diffusers", "transformers")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``"auto"``: bf16 where it is faster than fp32 (CUDA with bf16; a CPU whose bf16 convolution
    measured faster, see :func:`runtime.hardware.cpu_bf16_speedup`), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if fast_bf16(str(torch.device(device))) else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# Weight files that are pickles: loading one runs whatever code it names.
_PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_pipeline_folder(path: str | Path) -> dict:
    """model_index.json of a local pipeline folder, refused before anything in it is loaded if it
    would make diffusers run code: a component from another library, or model weights that are
    pickles only (``.bin``, ``.ckpt``, ...). A single checkpoint file is not a pipeline folder."""
    path = Path(path)
    if path.is_file():
        kind = "a pickle checkpoint, which would run code when loaded" if path.suffix.lower() in _PICKLES else "a single file"
        raise InputError(f"'{path}' is {kind}; give a pipeline folder of safetensors weights (every training run writes one)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise InputError(f"'{path}' is not a pipeline folder: it has no model_index.json")
    index = json.loads(index_file.read_text())
    if not isinstance(index.get("_class_name"), str):
        raise InputError(f"{index_file}: _class_name {index.get('_class_name')!r} points at custom code; refused")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if entry[0] not in _TRUSTED_LIBRARIES:
            raise InputError(
                f"{index_file}: component '{name}' comes from '{entry[0]}', which would be imported as code; "
                f"only {', '.join(_TRUSTED_LIBRARIES)} components are loaded"
            )
        _check_weights(path / name)
    return index


def is_xl_index(index: dict) -> bool:
    """Whether a folder's model_index.json is Stable Diffusion XL's (two text encoders); a refiner's (no first text
    encoder, an aesthetic-score conditioning) is refused."""
    if "text_encoder_2" not in index:
        return False
    if not isinstance(index.get("text_encoder"), list) or index["text_encoder"][0] is None:
        raise InputError(
            "this is a Stable Diffusion XL refiner folder (no first text encoder, aesthetic-score conditioning), which is "
            "not supported; give a base SDXL folder"
        )
    return True


def _check_weights(component: Path) -> None:
    """A model component (its folder has a config.json; tokenizers and schedulers do not) must hold safetensors weights."""
    if not (component / "config.json").is_file() or any(component.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in component.iterdir() if p.suffix.lower() in _PICKLES)
    if pickles:
        raise InputError(
            f"{component}: its weights are pickles ({', '.join(pickles)}), which would run code when loaded; refused. "
            "Convert them to safetensors, or use a folder a training run wrote"
        )
    raise InputError(f"{component}: no weights (*.safetensors) beside its config.json")


# the steps, guidance and sampler a folder is meant to be sampled with: a stage-2 run's sample settings (the default
# model's guidance 1.5, not Stable Diffusion's 7.5), a few-step student's own; diffusers ignores the file
SAMPLING_FILE = "sampling.json"


def write_sampling(folder: str | Path, steps: int, guidance: float, scheduler: str) -> None:
    """The folder's ``sampling.json``: the steps, guidance and sampler ``sampling_defaults`` reads back."""
    write_json_atomic(Path(folder) / SAMPLING_FILE, {"steps": steps, "guidance": guidance, "scheduler": scheduler})


def sampling_defaults(folder: str | Path) -> dict:
    """What a folder says it samples with (its ``sampling.json``: steps, guidance, scheduler), or {}."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    return {k: settings[k] for k in ("steps", "guidance", "scheduler") if k in settings}
