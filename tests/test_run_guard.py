"""training/run/guard.py: one run per output_dir (the lock), a stop at a step's end on SIGTERM to the
launcher, Ctrl-C or the launcher's death (a checkpoint, every process gone, an exact resume), a second
Ctrl-C, a signal before the steps, the end of a multi-process run, and a diverged loss that stops at its
step with one line and exports nothing."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from runtime.errors import RunError, Stopped
from tests.conftest import (
    FAST_STEPS,
    ROOT,
    TINY_LDM_CONFIG,
    free_port,
    fresh_state,
    ldm_cfg,
    max_difference,
    no_traceback_of_ours,
    unet_weights,
)
from training.run.guard import output_lock
from training.train_ldm import train as train_job

train = fresh_state(train_job)


# ---- one run per output_dir ----------------------------------------------------------------------


def test_a_second_launch_on_a_busy_output_dir_is_refused_naming_the_process(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    with output_lock(out):  # as a run in progress holds it
        with pytest.raises(RunError, match=rf"output_dir '{out}' is in use by process {os.getpid()} on "):
            train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=2", *FAST_STEPS))
    assert not (out / "checkpoints").exists()


def test_the_lock_of_a_killed_run_is_not_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training.run.guard import output_lock\n"
                               f"with output_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match=f"in use by process {holder.pid}"), output_lock(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with output_lock(tmp_path):  # the kernel released it with the process
        pass


# ---- signals -------------------------------------------------------------------------------------


def _job(out: Path, data, vae, steps: int, *overrides: str) -> list[str]:
    """``-m training.train_ldm`` on the tiny config, logging every step, with no checkpoint or grid on the way."""
    return ["-m", "training.train_ldm", "--config", str(TINY_LDM_CONFIG), f"data.path={data}", f"model.vae={vae}",
            f"output_dir={out}", f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=1000",
            "train.sample_every=1000", "model.check_images=0", *overrides]  # fmt: skip


def _launch(out: Path, data, vae, steps: int, processes: int = 1, overrides: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), *_job(out, data, vae, steps, *overrides)]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _trainers_once_training(launcher: subprocess.Popen, out: Path, processes: int) -> list[psutil.Process]:
    """The launch's training processes, once its log shows step 3 trained."""
    _wait_for_step(out, 3)
    trainers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "training.train_ldm" in " ".join(p.cmdline())]
    assert len(trainers) == processes, launcher.stderr.read()[-2000:]
    return trainers


def _wait_for_step(out: Path, step: int) -> None:
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= step and "loss" in r for r in _log(out)) and time.time() < deadline:
        time.sleep(0.1)


def _shell_status(returncode: int) -> int:
    """The exit status a shell shows (128 + N for a process ended by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_saves_a_checkpoint_at_that_step_ends_every_process_and_resumes_exactly(openmoji_small, tiny_vae,
                                                                                                          tmp_path, processes):  # fmt: skip
    """`kill PID` of `accelerate launch`: with one process the launcher dies and the training
    process learns it (parent-death signal); with two, torchrun's agent passes SIGTERM on to both
    ranks and waits 30 s. Either way every rank stops after the same step, saves there, and ends.
    The two ranks (batch 4 each), relaunched, end with the U-Net and the losses of one rank with
    batch 8 that was never stopped: exact resume and 2 ranks = 1 rank at once (fp32: bf16 would round
    a batch of 8 differently from two of 4)."""
    out = tmp_path / "run"
    # with two ranks the runs also track post-hoc EMA profiles (of a U-Net under a frozen encoder): their snapshots too
    # must be one rank's, across the stop
    posthoc = ("model.text_encoder=minilm", "train.ema_decay=null", "train.ema.kind=posthoc", "train.ema.snapshot_every=2")
    per_rank = ("train.batch_size=4", "train.mixed_precision=fp32", *posthoc) if processes == 2 else ()
    launcher = _launch(out, openmoji_small, tiny_vae, 2000, processes, per_rank)
    trainers = _trainers_once_training(launcher, out, processes)
    launcher.send_signal(signal.SIGTERM)  # to the launcher only, as `kill PID` of the command would
    _, err = launcher.communicate(timeout=90)
    assert _shell_status(launcher.returncode) == (128 + signal.SIGTERM if processes == 1 else 1)  # as for Ctrl-C below
    gone, alive = psutil.wait_procs(trainers, timeout=60)
    assert not alive  # no training process outlived the launcher
    (stopped,) = [r for r in _log(out) if r.get("event") == "stopped"]
    step = stopped["step"]
    assert stopped["signal"] == "SIGTERM" and 3 <= step < 2000
    said = re.findall(r"stopped by SIGTERM at step (\d+):", err)
    assert said == [str(step)] * processes, err[-3000:]  # every rank, one step
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"] and not (out / "pipeline").exists()
    if processes == 1:  # a one-process checkpoint resumes like any other (test_train_ldm); the two ranks' is the one to see
        return

    one_rank = tmp_path / "one-rank"  # (constant LR after warm-up: max_steps does not change it)
    for run, procs, overrides in ((out, 2, per_rank), (one_rank, 1, ("train.batch_size=8", "train.mixed_precision=fp32", *posthoc))):
        proc = _launch(run, openmoji_small, tiny_vae, step + 2, procs, overrides)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert [r["event"] for r in _log(out) if "event" in r] == ["start", "stopped", "resume"]
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["processes"] == 2
    assert max_difference(unet_weights(out), unet_weights(one_rank)) < 1e-5
    snapshots = [sorted((run / "ema-snapshots").glob("*.safetensors")) for run in (out, one_rank)]
    assert [p.name for p in snapshots[0]] == [p.name for p in snapshots[1]] and snapshots[0][-1].name.startswith(f"step-{step + 2:08d}")
    assert all(max_difference(load_file(str(a)), load_file(str(b))) < 1e-5 for a, b in zip(*snapshots))
    losses = [{r["step"]: r["loss"] for r in _log(run) if "loss" in r} for run in (out, one_rank)]
    assert list(losses[0]) == list(losses[1]) == list(range(1, step + 3))  # the stop's step is in the curve, once
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_ctrl_c_stops_every_process_at_one_step_with_a_checkpoint(openmoji_small, tiny_vae, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the launcher's whole process group (torchrun's ranks are in
    sessions of their own and get it from the launcher). Two processes: one process is the test below."""
    out, processes = tmp_path / "run", 2
    launcher = _launch(out, openmoji_small, tiny_vae, 2000, processes, start_new_session=True)
    trainers = _trainers_once_training(launcher, out, processes)
    os.killpg(launcher.pid, signal.SIGINT)
    _, err = launcher.communicate(timeout=90)
    assert not psutil.wait_procs(trainers, timeout=60)[1]
    # the launcher's own status is torchrun's (the README says so): its agent raises SignalException and
    # exits 1. The trainer's own 130 is tested below.
    assert _shell_status(launcher.returncode) == 1, err[-3000:]
    (stopped,) = [r for r in _log(out) if r.get("event") == "stopped"]
    assert stopped["signal"] == "SIGINT" and no_traceback_of_ours(err), err[-3000:]
    assert re.findall(r"stopped by SIGINT at step (\d+):", err) == [str(stopped["step"])] * processes
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped['step']:08d}"]


# ``python -m training.train_ldm ARGS`` whose checkpoint write says when it starts (a file) and then takes a minute
SLOW_CHECKPOINT = """
import runpy, sys, time
from pathlib import Path
from accelerate import Accelerator
marker, save_state = Path(sys.argv.pop(1)), Accelerator.save_state
def slow_save_state(self, *args, **kwargs):
    marker.touch()
    time.sleep(60)
    return save_state(self, *args, **kwargs)
Accelerator.save_state = slow_save_state
sys.argv[0] = "training.train_ldm"
runpy.run_module("training.train_ldm", run_name="__main__", alter_sys=True)
"""


def test_a_second_ctrl_c_stops_at_once_without_saving_and_the_trainer_exits_130(openmoji_small, tiny_vae, tmp_path):
    """The training process itself (no launcher), so that its own exit status is seen. Its checkpoint write is made
    to take a minute: the second SIGINT is sent once that write has begun, and must end the process at once."""
    out, writing = tmp_path / "run", tmp_path / "writing"
    cmd = [sys.executable, "-c", SLOW_CHECKPOINT, str(writing), *_job(out, openmoji_small, tiny_vae, 2000)[2:]]
    trainer = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 3)
    trainer.send_signal(signal.SIGINT)
    deadline = time.time() + 120
    while not writing.exists() and trainer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert writing.exists() and list(out.glob("checkpoints/.tmp-step-*")), "the first SIGINT's checkpoint never began"
    sent = time.time()
    trainer.send_signal(signal.SIGINT)  # while the first one's checkpoint is being written
    _, err = trainer.communicate(timeout=90)
    assert time.time() - sent < 30, "it waited for the checkpoint"  # the write would have taken 60 s
    assert trainer.returncode == 128 + signal.SIGINT, err[-3000:]
    assert no_traceback_of_ours(err) and "stopped by a second SIGINT at once, without saving" in err, err[-3000:]
    assert not [r for r in _log(out) if r.get("event") == "stopped"] and not list((out / "checkpoints").glob("step-*"))


def test_when_the_launcher_is_killed_the_trainer_stops_at_a_step_with_a_checkpoint(openmoji_small, tiny_vae, tmp_path):
    """`kill -9` of `accelerate launch` (or its terminal closed): the kernel sends the trainer SIGTERM."""
    out = tmp_path / "run"
    launcher = _launch(out, openmoji_small, tiny_vae, 2000, 1)
    (trainer,) = _trainers_once_training(launcher, out, 1)
    launcher.kill()
    launcher.wait()
    assert not psutil.wait_procs([trainer], timeout=60)[1]  # it did not train on
    (stopped,) = [r for r in _log(out) if r.get("event") == "stopped"]
    assert stopped["signal"] == "SIGTERM" and [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped['step']:08d}"]


def test_a_signal_before_the_training_steps_stops_at_once_with_one_line(openmoji_small, tiny_vae, tmp_path, monkeypatch):
    import training.stage2.cache as job  # where the job builds its latent cache

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(job, "build_latent_cache", interrupted)
    with pytest.raises(Stopped, match="stopped by SIGTERM before or after the training steps") as err:
        train(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", "train.max_steps=2", *FAST_STEPS))
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the process's own handler is back


# ---- the end of a multi-process run -------------------------------------------------------------


def test_two_processes_end_their_process_group_without_hanging(tmp_path):
    """Six rounds of two gloo processes, each round a guarded job that ends as the training jobs do
    (tests/end_groups.py). Were the group destroyed while the DDP model lives (as
    ``accelerator.end_training()`` in ``run.finish`` did), the model's Reducer would free it holding the
    GIL, while a gloo worker waits for the GIL: here that hung both processes in round 3."""
    cmd = [sys.executable, "tests/end_groups.py", "6", str(free_port()), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: the last rounds ended were {out.split()[-4:]}")
    assert proc.returncode == 0, err[-3000:]
    assert out.split("\n").count("ended 5") == 2


# ---- divergence ----------------------------------------------------------------------------------


def test_a_diverged_loss_stops_with_one_line_a_non_zero_exit_and_no_export(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train_ldm", "--config", str(TINY_LDM_CONFIG), f"data.path={openmoji_small}",
           f"model.vae={tiny_vae}", f"output_dir={out}", "train.lr=1e6", "train.max_steps=30", "train.log_every=1",
           "train.checkpoint_every=1000", "model.check_images=0"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (line,) = [s for s in run.stderr.splitlines() if s.startswith("error:")]
    step = int(re.search(r"the training loss is not finite at step (\d+):", line).group(1))
    losses = [(r["step"], r["loss"]) for r in _log(out) if "loss" in r]  # every step before it logged, and finite
    assert step > 1 and [s for s, _ in losses] == list(range(1, step)) and all(map(math.isfinite, [v for _, v in losses]))
    assert "nothing was exported and there is no checkpoint" in line
    assert "Lower train.lr" in line and not (out / "pipeline").exists() and not (out / "metrics.json").exists()


def test_a_stage_1_run_that_diverges_exports_nothing(openmoji_small, tmp_path):
    from tests.conftest import autoencoder_cfg
    from training.train_autoencoder import train as train_ae

    cfg = autoencoder_cfg(openmoji_small, tmp_path / "ae", "train.lr=1e8", "train.max_steps=20", "train.checkpoint_every=1000")
    with pytest.raises(RunError, match="the training loss is not finite at step"):
        fresh_state(train_ae)(cfg)
    assert not (tmp_path / "ae" / "vae").exists()


def test_non_finite_weights_are_never_exported():
    from training.run.guard import check_finite

    net = torch.nn.Linear(2, 2)
    check_finite(net, "U-Net")
    with torch.no_grad():
        net.bias[0] = float("nan")
    with pytest.raises(RunError, match=r"1 tensors of the U-Net are not finite \(first: bias\); nothing was exported"):
        check_finite(net, "U-Net")


def test_a_process_that_learns_of_a_stop_from_another_names_that_ones_signal_and_its_own_first_sigint_still_saves(tmp_path):
    """Two ranks under torchrun get Ctrl-C's SIGINT from its agent one after the other: the rank it reaches second
    may learn of the stop from the first (at the step's end) before its own SIGINT arrives, during the checkpoint.
    It says the stop is by SIGINT, like the first, and that late SIGINT is its first, not a second Ctrl-C."""
    from types import SimpleNamespace

    from training.run.guard import StopGuard

    other_rank_was_signalled = torch.tensor([[float(signal.SIGINT), 0.0], [0.0, 0.0]])  # (processes, 2), as gathered
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=lambda t: other_rank_was_signalled)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        guard = StopGuard(accelerator, tmp_path, keep_checkpoints=1)
        assert guard.after_step(4, 0.5) and guard.signal_name == "SIGINT"
        guard._request(signal.SIGINT, None)  # its own, during the checkpoint: no Stopped raised
        with pytest.raises(Stopped, match="second SIGINT"):
            guard._request(signal.SIGINT, None)  # a real second Ctrl-C still stops at once
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
