"""Atomic checkpoints on top of ``accelerator.save_state``; resume from the latest one.

``output_dir/checkpoints/step-00000100/`` holds what ``save_state`` writes (models as
safetensors, optimizers, schedulers, every process's RNG state) plus ``trainer_state.json``.
The models' frozen parameters are left out: each launch loads them from where they came from.
A checkpoint is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoint intact; only the last ``keep`` are kept. Its
``manifest.json`` (every file's size and SHA-256), written last, is what resuming verifies: a
damaged newest checkpoint is skipped, with a message, for the newest one that verifies.
A write that fails (no space left, a read-only folder) stops the run with one line naming what
was being written; the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME
from safetensors import safe_open

from runtime.files import file_digest, replace_dir, write_json_atomic
from training.config import RunError

MANIFEST = "manifest.json"

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
        # left by a run killed mid-save: the output_dir lock (training/guard.py) means no other run is writing here
        for stale in root.glob(".tmp-step-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        _writing(lambda: tmp.mkdir(parents=True), tmp, output_dir)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(_without_frozen)
    try:
        _writing(lambda: accelerator.save_state(str(tmp), safe_serialization=True), tmp, output_dir)
    finally:
        hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:

        def finish() -> None:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            write_json_atomic(
                tmp / MANIFEST,
                {
                    "files": {
                        p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
                        for p in sorted(tmp.rglob("*"))
                        if p.is_file()
                    }
                },
            )

        _writing(finish, tmp, output_dir)
        replace_dir(tmp, final)  # re-saving a step swaps it; the old copy is dropped after
        for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _frozen(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def _without_frozen(models: list, weights: list[dict], output_dir: str) -> None:
    """``save_state``'s hook: each model's weights without its frozen parameters (a LoRA run's base U-Net, a frozen
    encoder). Every launch loads those from the folder they come from, so a checkpoint holds what trains (with its
    optimizer state): a LoRA run of an SD 1.5-size U-Net writes megabytes, not the 3.4 GB fp32 U-Net."""
    for i, model in enumerate(models):
        if frozen := _frozen(model):
            # an OrderedDict, as state_dict() gives: accelerate then makes each tensor contiguous (channels_last) for safetensors
            weights[i] = OrderedDict((k, v) for k, v in weights[i].items() if k not in frozen)


def _holds_what_trains(ckpt: Path):
    """``load_state``'s hook (it loads with ``strict=False``, the frozen weights being absent): each model file holds
    every weight that trains and none the model lacks, else the checkpoint is of another run's settings."""

    def check(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            with safe_open(Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors", "pt") as f:
                held = set(f.keys())
            names = set(model.state_dict())
            missing, unknown = sorted(names - _frozen(model) - held), sorted(held - names)
            if missing or unknown:
                what = f"lacks {len(missing)} weights this run trains (e.g. {missing[0]})" if missing else ""
                what += (" and " if missing else "") + (
                    f"holds {len(unknown)} this model lacks (e.g. {unknown[0]})" if unknown else ""
                )
                raise RunError(
                    f"cannot resume {ckpt}: it {what}, so it was written with other model or LoRA settings. "
                    "Use the run's settings, or a new output_dir"
                )

    return check


def _writing(write, tmp: Path, output_dir: str | Path) -> None:
    """Run ``write``; an I/O failure (torch reports a full disk as a RuntimeError) removes the
    half-written checkpoint and becomes a RunError saying why and that the last one is intact."""
    try:
        write()
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(Path(output_dir)).free if Path(output_dir).exists() else None
        if isinstance(err, OSError) and err.errno is not None:
            why = f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)}{f': {err.filename}' if err.filename else ''})"
        elif free is not None and free < 256 << 20:
            why = f"no space left on the device ({free >> 20} MiB free)"
        else:
            raise  # not an I/O problem we can name: a real bug, keep the traceback
        last = latest_checkpoint(output_dir)
        kept = f"the last checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        raise RunError(
            f"could not write the checkpoint {tmp.name.removeprefix('.tmp-')} in {tmp.parent}: {why}; {kept}. "
            "Free space (or fix the folder's permissions) and relaunch to resume"
        ) from None


def verify_checkpoint(folder: Path) -> str | None:
    """None if every file listed in the manifest is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (cut short, or written by a version without manifests)"
    except (ValueError, KeyError, OSError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} expected"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def resume_from_latest(accelerator: Accelerator, output_dir: str | Path, layout: dict | None = None) -> dict | None:
    """Load the latest checkpoint into the prepared objects; returns its trainer state or None.

    ``layout`` holds the settings that fix the position in the data (batch size, processes, ...):
    resuming with different values would silently train on a different stream, so it is an error.
    """
    found = checkpoints(output_dir)
    skipped: list[str] = []
    for ckpt in reversed(found):  # the newest that verifies
        problem = verify_checkpoint(ckpt)
        if problem is None:
            break
        skipped.append(f"{ckpt.name}: {problem}")
        if accelerator.is_main_process:
            print(f"warning: skipping the damaged checkpoint {ckpt}: {problem}")
    else:
        if found:
            raise RunError(
                f"no checkpoint in {Path(output_dir) / 'checkpoints'} can be resumed ({'; '.join(skipped)}); move the "
                "checkpoints folder away to start again from step 0, or use another output_dir"
            )
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for key, value in (layout or {}).items():
        if key in state and state[key] != value:
            raise RunError(
                f"cannot resume {ckpt}: it was written with {key}={state[key]}, this run has {key}={value}. "
                f"Use the same setting, or a new output_dir"
            )
    hook = accelerator.register_load_state_pre_hook(_holds_what_trains(ckpt))
    try:
        accelerator.load_state(str(ckpt), strict=False)  # frozen weights: from the folder they were loaded from
    finally:
        hook.remove()
    if skipped and accelerator.is_main_process:
        print(f"resuming from the older checkpoint {ckpt.name} instead")
    return state
