"""Where a run's figures go: ``log.jsonl`` always, and the experiment trackers accelerate supports
(``train.report_to``: TensorBoard by default when it is installed, W&B, MLflow, ...), through
accelerate's own tracking API.

    log = RunLog(accelerator, out, "train_ldm", cfg, step)   # after resume: step is where it resumed
    log.write(step=step, loss=0.08, lr=1e-4)                  # one line in log.jsonl, and each number to every tracker
    log.images("samples", grid_png, step)                     # a saved grid, to the trackers that take images

A record's numbers go to the trackers under their log.jsonl keys (``loss``, ``lr``, ``val_psnr``);
an event's under ``event/key`` (``autoencoder_check/vae_psnr``), except the start, resume and stop
records, which describe the run rather than measure it. A relaunch resumed from step S (0 without
a checkpoint) drops the lines the last launch wrote after S from log.jsonl, and TensorBoard purges
the same (``purge_step``): both continue the same curves at the right steps, each step once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import ConfigError, to_dict

AUTO, NONE, ALL = "auto", "none", "all"
UNTRACKED_EVENTS = ("start", "resume", "stopped")
_OPEN: list["RunLog"] = []  # closed by close_all() when a job returns or raises (training.guard.guarded)
INSTALL_HINT = {"tensorboard": "pip install 'latent-diffusion-lab[tensorboard]' (or pip install tensorboard)"}


def tracker_names(report_to: str) -> list[str]:
    """The accelerate trackers ``train.report_to`` asks for: ``auto`` (TensorBoard if installed,
    else none), ``none``, ``all`` (every installed one), or names joined by commas. A ConfigError
    names an unknown tracker, or one that is not installed and how to install it."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != ALL]  # accelerate's public list of its trackers
    installed = [str(t) for t in get_available_trackers()]
    if report_to == AUTO:
        return ["tensorboard"] if "tensorboard" in installed else []
    if report_to == NONE:
        return []
    if report_to == ALL:
        return installed
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"train.report_to: unknown tracker '{name}'; valid: {AUTO}, {NONE}, {ALL}, or any of "
                f"{', '.join(known)} joined by commas"
            )
        if name not in installed:
            raise ConfigError(
                f"train.report_to: '{name}' is not installed; {INSTALL_HINT.get(name, f'pip install {name}')}, or choose {NONE}"
            )
    return names


def hyperparameters(cfg) -> dict:
    """The run's config flattened to ``section.key`` -> bool / int / float / str (what every tracker takes)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists
            flat[prefix] = json.dumps(value)

    walk("", to_dict(cfg))
    return flat


def tracked_values(record: dict) -> dict[str, float]:
    """The numbers of a log.jsonl record as the trackers get them (see the module's docstring)."""
    event = record.get("event")
    if event in UNTRACKED_EVENTS:
        return {}
    prefix = f"{event}/" if event else ""
    return {
        f"{prefix}{k}": v
        for k, v in record.items()
        if k not in ("time", "step", "event") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class RunLog:
    """``log.jsonl`` of a run plus its trackers (on the main process; a no-op elsewhere)."""

    def __init__(self, accelerator, out: Path, job: str, cfg, step: int) -> None:
        self.accelerator, self.path = accelerator, Path(out) / "log.jsonl"
        self.enabled = accelerator.is_main_process
        again = self.path.is_file()  # a relaunch: resumed at `step`, or from 0 when no checkpoint was made
        if self.enabled and again:
            self._drop_after(step)
        if accelerator.log_with:  # a first launch records the config; a relaunch purges what the last one wrote after `step`
            accelerator.init_trackers(
                job,
                config=None if again else hyperparameters(cfg),
                init_kwargs={"tensorboard": {"purge_step": step + 1}} if again else {},
            )
            _OPEN.append(self)

    def close(self) -> None:
        """Finish the trackers (TensorBoard's writer flushes and closes; W&B ends its run): at the
        end of the job, or on its way out after a stop, a diverged loss or an error."""
        if self in _OPEN:
            _OPEN.remove(self)
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()  # accelerator.end_training() would finish them again

    def _drop_after(self, step: int) -> None:
        """Keep the lines up to ``step`` (the checkpoint this run resumes from): a killed run's later
        lines describe steps that are trained again."""
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(self.path)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        values = tracked_values(record)
        if values and self.accelerator.trackers:
            self.accelerator.log(values, step=record.get("step"))

    def images(self, tag: str, png: Path, step: int) -> None:
        """A saved grid to every tracker that takes images (TensorBoard, W&B, Aim, ClearML, SwanLab);
        the others have the PNG in ``output_dir/samples/``."""
        if not (self.enabled and self.accelerator.trackers):
            return
        image = np.asarray(Image.open(png).convert("RGB"))  # (H, W, 3) uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "aim":
                tracker.log_images({tag: image}, step=step)
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [image]}, step=step)


class LossWindow:
    """The losses of the micro-batches since the last log record: what a stage-2 job logs as its loss (the mean over
    them and over processes) and its images per second."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.loss, self.micro_batches = time.perf_counter(), 0.0, 0

    def add(self, step_loss: float, micro_batches: int) -> None:
        """After an optimizer step: the sum of its ``micro_batches`` micro-batch losses."""
        self.loss, self.micro_batches = self.loss + step_loss, self.micro_batches + micro_batches

    def write(self, log: RunLog, step: int, lr: float, global_batch: int, bar) -> None:
        """The log record of ``step`` (loss, LR, images per second) and the bar's loss; the window starts again."""
        import torch

        accelerator = log.accelerator
        mean_loss = accelerator.reduce(torch.tensor(self.loss / self.micro_batches, device=accelerator.device), "mean").item()
        images_per_s = round(self.micro_batches * global_batch / (time.perf_counter() - self.start), 2)
        log.write(step=step, loss=round(mean_loss, 6), lr=lr, images_per_s=images_per_s)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        self.reset()


def _step_of(line: str) -> float:
    """A log line's step; a line cut short (a kill or a full disk mid-write) counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def close_all() -> None:
    """Close every RunLog still open (a job that raised before its end)."""
    for log in list(_OPEN):
        log.close()
