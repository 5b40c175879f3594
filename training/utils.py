"""Small helpers shared by the training jobs: image grids, CPU threads, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Each row is a (B, 3, H, W) batch in [-1, 1]; rows are stacked top to bottom."""
    imgs = [to_uint8(r) for r in rows]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in imgs], axis=0)  # (rows*H, B*W, 3)
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def set_cpu_threads(requested: int | None, local_processes: int) -> int:
    """Give each process its share of the CPU cores and return the thread count used.

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless told otherwise (measured here: half
    the speed on 2 cores). ``requested=None`` means all cores this process may use, divided by
    the processes on this machine.
    """
    import torch

    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, cores // max(1, local_processes))
    torch.set_num_threads(requested)
    return requested


def run_job(job, cfg) -> None:
    """A training job's command-line entry: what the user can act on (bad input before any long
    work, a damaged checkpoint, a busy output_dir, a full disk, a diverged loss, a stop on a
    signal) ends the command with one line and a non-zero exit instead of a traceback."""
    from runtime.errors import one_line_errors

    with one_line_errors():
        job(cfg)
