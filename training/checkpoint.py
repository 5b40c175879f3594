"""Atomic checkpoints on top of ``accelerator.save_state``; resume from the latest one.

``output_dir/checkpoints/step-00000100/`` holds what ``save_state`` writes (models as
safetensors, optimizers, schedulers, every process's RNG state) plus ``trainer_state.json``.
A checkpoint is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoint intact; only the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from runtime.files import replace_dir

_NAME = re.compile(r"^step-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Every process must call this (each saves its own RNG state)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-step-*") if root.is_dir() else []:  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        replace_dir(tmp, final)  # re-saving a step swaps it; the old copy is dropped after
        for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_from_latest(accelerator: Accelerator, output_dir: str | Path, layout: dict | None = None) -> dict | None:
    """Load the latest checkpoint into the prepared objects; returns its trainer state or None.

    ``layout`` holds the settings that fix the position in the data (batch size, processes, ...):
    resuming with different values would silently train on a different stream, so it is an error.
    """
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for key, value in (layout or {}).items():
        if key in state and state[key] != value:
            raise ValueError(
                f"cannot resume {ckpt}: it was written with {key}={state[key]}, this run has {key}={value}. "
                f"Use the same setting, or a new output_dir"
            )
    accelerator.load_state(str(ckpt))
    return state
