"""What keeps a training run safe from the world around it: one run per ``output_dir`` (a lock),
a clean stop on SIGTERM / SIGINT or when the launcher dies (a checkpoint at the step every
process agrees on), a stop on a loss that is no longer finite (nothing exported), and an end of
the process group that cannot hang.

    @guarded                                   # the lock, and the signal handlers put back after
    def train(cfg): ...
        stop = StopGuard(accelerator, out, keep, bar)  # before the loop: signals now stop at a step's end
        ...
        if stop.after_step(step, loss):                # every step; raises RunError on a non-finite loss
            raise stop.checkpoint_and_stop(step, trainer_state, log)
        stop.disarm()                                  # after the loop: a signal stops at once again
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import gc
import math
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from runtime.errors import RunError, Stopped
from training.run.checkpoint import latest_checkpoint, save_checkpoint
from training.run.tracking import close_all

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_NAME = ".lock"


# ---- one run per output_dir ------------------------------------------------------------------


@contextmanager
def output_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir/.lock`` (an advisory ``flock``: the kernel releases it when the holder
    exits, crash or kill -9 included, so it is never stale). Another run on the same folder stops
    with a RunError naming the process that holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunError(
                f"output_dir '{out}' is in use by {holder}; wait for that run to end, stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0
        )
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _is_main_process() -> bool:
    """Rank 0 of the launch (torchrun and accelerate set RANK; a plain ``python -m`` is rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def guarded(job):
    """``job(cfg, **kw)`` under the output_dir lock (held by the main process), with a signal
    arriving before or after the training steps stopping it at once as a :class:`Stopped`, and
    the process's own signal handlers put back when it returns."""

    @functools.wraps(job)
    def run(cfg, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        saved = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main_thread else {}
        for s in saved:
            signal.signal(s, _stop_now)
        die_with_parent()
        error = None
        try:
            if _is_main_process():
                with output_lock(cfg.output_dir):
                    return job(cfg, **kwargs)
            return job(cfg, **kwargs)
        except BaseException as err:
            error = err
            raise
        finally:
            close_all()  # the trackers' files are complete whatever ended the job
            end_process_group(error)
            for s, handler in saved.items():
                signal.signal(s, handler)

    return run


def end_process_group(error: BaseException | None = None) -> None:
    """End the launch's process group, if this process is in one, in the one order that cannot hang.

    torch's gloo backend frees each finished collective on one of its worker threads, and freeing one
    takes the GIL. The group's destructor joins those threads. Freed from DDP's Reducer (when the
    wrapped model goes, after ``destroy_process_group`` has dropped the group's other references: what
    ``accelerator.end_training()`` at a job's end leads to), the destructor holds the GIL while it waits,
    and a worker still freeing a collective waits for the GIL: both wait forever (py-spy on a 2-core
    AMD EPYC Milan; ``tests/test_run_guard.py`` makes it happen in a few rounds). So the job's objects go
    first, while this function holds a reference to the group: the frames of ``error``'s traceback,
    then the reference cycles (accelerate's wrappers make some). The group's own Python object,
    dropped last, frees it with the GIL released (torch's bindings do that for a ProcessGroup)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    group = torch.distributed.group.WORLD  # noqa: F841  (held until the end: the last reference)
    if error is not None:
        traceback.clear_frames(error.__traceback__)  # the frames' locals (the model); the traceback still prints
    gc.collect()
    torch.distributed.destroy_process_group()
    del group


def _stop_now(signum, frame) -> None:
    raise Stopped(
        signum,
        f"stopped by {signal.Signals(signum).name} before or after the training steps; every finished "
        "checkpoint and cache shard is kept: relaunch the same command to continue",
    )


def die_with_parent() -> None:
    """Ask the kernel for a SIGTERM when the parent (the launcher) dies (Linux ``PR_SET_PDEATHSIG``),
    so that a training process never outlives the command that started it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: StopGuard still checks the parent every step
        pass


# ---- a stop at a step's end --------------------------------------------------------------------


class StopGuard:
    """From its creation until :meth:`disarm`, SIGTERM / SIGINT (a second SIGINT stops at once)
    and the death of the parent process request a stop at the end of the current step; every
    process learns of a request on any of them in :meth:`after_step`, so all stop at the same step."""

    def __init__(self, accelerator, output_dir: str | Path, keep_checkpoints: int, bar=None) -> None:
        self.accelerator, self.out, self.keep, self.bar = (
            accelerator,
            Path(output_dir),
            keep_checkpoints,
            bar,
        )  # bar: closed before a stop is said
        self.signum: int | None = None  # the signal the stop is said to be by (the same on every process)
        self.received: int | None = None  # the first signal this process itself got
        self.parent = os.getppid()
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                signal.signal(s, self._request)

    def _request(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: no checkpoint
            ckpt = latest_checkpoint(self.out)
            raise Stopped(
                signum,
                f"stopped by a second SIGINT at once, without saving: {f'the last checkpoint is {ckpt}' if ckpt else 'there is no checkpoint'}; "
                "relaunch the same command to continue from it",
            )
        if self.received is None:
            self.received = signum
        if self.signum is None:  # the first signal is the one said (a launcher that dies of it sends SIGTERM after)
            self.signum = signum

    def after_step(self, step: int, loss: float) -> bool:
        """Whether to stop after ``step`` (on every process alike); raises RunError if ``loss`` (this
        step's, on any process) is not finite."""
        if self.signum is None and os.getppid() != self.parent:  # the launcher died without a word
            self.signum = signal.SIGTERM
        flags = torch.tensor([[float(self.signum or 0), float(not math.isfinite(loss))]])  # (1, 2): signal number, bad loss
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(flags.to(self.accelerator.device)).cpu()  # (processes, 2)
        asked = [int(s) for s in flags[:, 0].tolist() if s > 0]
        if asked and self.signum is None:  # another process was sent the signal first: every process names that one
            self.signum = asked[0]
        if flags.any() and self.bar is not None:
            self.bar.close()
        if flags[:, 1].any():
            ckpt = latest_checkpoint(self.out)
            kept = f"the last checkpoint ({ckpt.name}) is kept" if ckpt else "there is no checkpoint"
            raise RunError(
                f"the training loss is not finite at step {step}: the run diverged; nothing was exported and {kept}. "
                "Lower train.lr, or train in fp32 (train.mixed_precision=fp32), and relaunch"
            )
        return bool(asked)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def checkpoint_and_stop(self, step: int, trainer_state: dict, log) -> Stopped:
        """The stop after ``step`` (every process calls it): the checkpoint with ``trainer_state``, the ``stopped`` record
        in the run's log, and the :class:`Stopped` to raise."""
        save_checkpoint(self.accelerator, self.out, step, trainer_state, self.keep)
        log.write(step=step, event="stopped", signal=self.signal_name)
        return Stopped(
            self.signum or signal.SIGTERM,
            f"stopped by {self.signal_name} at step {step}: checkpoint "
            f"{self.out / 'checkpoints' / f'step-{step:08d}'} saved; relaunch the same command to resume",
        )

    def disarm(self) -> None:
        """After the training steps (export, evaluation): the progress bar closes and a signal stops at once again."""
        if self.bar is not None:
            self.bar.close()
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                signal.signal(s, _stop_now)


def check_finite(module: torch.nn.Module, what: str) -> None:
    """Refuse to export ``module`` if any weight is NaN or infinite (a RunError naming them)."""
    bad = [name for name, p in module.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise RunError(
            f"{len(bad)} tensors of the {what} are not finite (first: {bad[0]}); nothing was exported. The run "
            "diverged: lower train.lr, or train in fp32 (train.mixed_precision=fp32), and train again"
        )
