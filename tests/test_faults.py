"""Faults lose nothing and speak one line (issue 15): damaged checkpoints and cache shards, SIGTERM
to the launcher, a second launch on one output_dir, a full disk, a diverged loss, refused folders,
and the bf16 decision."""

from __future__ import annotations

import errno
import json
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

from runtime.errors import RunError, Stopped
from tests.conftest import ROOT, fresh_state
from tests.test_train_ldm import TINY_LDM_CONFIG, cfg_for, unet_weights
from training.guard import output_lock
from training.train_ldm import train as train_job

train = fresh_state(train_job)
STEPS = ["train.checkpoint_every=2", "train.sample_every=100", "model.check_images=0"]


@pytest.fixture(scope="module")
def uninterrupted(openmoji_small, tiny_vae, tmp_path_factory) -> dict:
    """The EMA U-Net of a 6-step run that nothing interrupted."""
    out = tmp_path_factory.mktemp("faults") / "full"
    train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS))
    return unet_weights(out)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- checkpoints ------------------------------------------------------------------------------


def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one_and_the_run_ends_the_same(openmoji_small, tiny_vae, uninterrupted,
                                                                                             tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS), stop_after_steps=4)  # checkpoints 2 and 4
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk or a bad copy
    capsys.readouterr()
    train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS))
    said = capsys.readouterr().out
    assert "skipping the damaged checkpoint" in said and "step-00000004: model.safetensors has" in said
    assert "resuming from the older checkpoint step-00000002" in said
    assert _same(unet_weights(out), uninterrupted)


def test_no_checkpoint_that_verifies_is_an_error_naming_each_never_a_restart_from_step_0(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS), stop_after_steps=4)
    (out / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    optimizer = out / "checkpoints" / "step-00000004" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size, other bytes
    with pytest.raises(RunError, match=r"no checkpoint .* can be resumed \(step-00000004: optimizer.bin does not match its SHA-256; "
                                       r"step-00000002: it has no manifest.json"):  # fmt: skip
        train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS))


def test_a_full_disk_while_checkpointing_is_one_line_the_last_checkpoint_stays_and_a_relaunch_resumes(openmoji_small, tiny_vae,
                                                                                                        uninterrupted, tmp_path, monkeypatch):  # fmt: skip
    from accelerate import Accelerator

    out, real = tmp_path / "run", Accelerator.save_state

    def fills_the_disk(self, folder, **kwargs):
        if folder.endswith("step-00000004"):
            Path(folder, "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder, "optimizer.bin")))
        return real(self, folder, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    with pytest.raises(RunError, match=r"could not write the checkpoint step-00000004 .*No space left on device \(ENOSPC: .*optimizer.bin\); "
                                       r"the last checkpoint .*step-00000002 is intact"):  # fmt: skip
        train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # the half-written one is gone
    monkeypatch.setattr(Accelerator, "save_state", real)
    train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=6", *STEPS))
    assert _same(unet_weights(out), uninterrupted)


def test_a_torch_write_failure_on_a_full_disk_is_named_as_one(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'."""
    import shutil

    from training.checkpoint import _writing

    def torch_fails():
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5888 vs 5776")

    (tmp_path / "checkpoints" / ".tmp-step-00000008").mkdir(parents=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(RunError, match=r"step-00000008 .*no space left on the device \(1 MiB free\); no earlier checkpoint exists"):
        _writing(torch_fails, tmp_path / "checkpoints" / ".tmp-step-00000008", tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 0, 10 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not a disk problem: the traceback stays
        _writing(torch_fails, tmp_path / "checkpoints" / ".tmp-step-00000008", tmp_path)


# ---- the latent cache --------------------------------------------------------------------------


def test_a_zeroed_or_truncated_shard_is_named_and_encoded_again_to_the_same_cache(tmp_path, capsys):
    from tests.test_latent_cache import _files, _setup
    from training.latent_cache import build_latent_cache, load_latent_cache

    vae, data, records = _setup(tmp_path, n=10)
    build = lambda: build_latent_cache(tmp_path / "cache", {"k": 1}, vae, records, data, batch_size=2, shard_size=3,  # noqa: E731
                                       show_progress=False)  # fmt: skip
    folder = build()
    before = _files(folder)
    (folder / "shard-00001.safetensors").write_bytes(b"")  # zeroed
    shard = folder / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert build() == folder and _files(folder) == before
    said = capsys.readouterr().out
    assert "shard-00001.safetensors has 0 bytes" in said and "shard-00002.safetensors has" in said and "encoding the damaged shards again" in said
    assert len(load_latent_cache(folder, records)) == 10


def test_a_shard_without_a_readable_image_is_a_valid_empty_shard_not_an_empty_file(tmp_path):
    from PIL import Image

    from autoencoder import build_autoencoder
    from tests.conftest import write_imagefolder
    from training.data import DataConfig, load_records
    from training.latent_cache import build_latent_cache, load_latent_cache

    images = {"0.png": Image.new("RGB", (32, 32), "red"), "1.png": b"not a png", "2.png": b"nor this", "3.png": Image.new("RGB", (32, 32))}
    data = DataConfig(path=str(write_imagefolder(tmp_path / "imgs", images)), caption="x")
    records = load_records(data.path, data)
    folder = build_latent_cache(tmp_path / "cache", {"k": 1}, build_autoencoder("tiny", 32).eval(), records, data, shard_size=1,
                                show_progress=False)  # fmt: skip
    assert json.loads((folder / "complete.json").read_text())["shard_rows"] == [1, 0, 0, 1]
    assert all(p.stat().st_size > 0 for p in folder.glob("shard-*"))  # 0 bytes would be damage
    assert load_latent_cache(folder, records).source_index.tolist() == [0, 3]


# ---- one run per output_dir ----------------------------------------------------------------------


def test_a_second_launch_on_a_busy_output_dir_is_refused_naming_the_process(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    with output_lock(out):  # as a run in progress holds it
        with pytest.raises(RunError, match=rf"output_dir '{out}' is in use by process {os.getpid()} on "):
            train(cfg_for(openmoji_small, tiny_vae, out, "train.max_steps=2", *STEPS))
    assert not (out / "checkpoints").exists()


def test_the_lock_of_a_killed_run_is_not_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training.guard import output_lock\n"
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


def _launch(out: Path, data, vae, steps: int, processes: int = 1) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), "-m", "training.train_ldm",
           "--config", str(TINY_LDM_CONFIG), f"data.path={data}", f"model.vae={vae}", f"output_dir={out}", f"train.max_steps={steps}",
           "train.log_every=1", "train.checkpoint_every=1000", "train.sample_every=1000", "model.check_images=0"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_saves_a_checkpoint_at_that_step_ends_every_process_and_resumes_exactly(openmoji_small, tiny_vae,
                                                                                                          tmp_path, processes):  # fmt: skip
    """`kill PID` of `accelerate launch`: with one process the launcher dies and the training
    process learns it (parent-death signal); with two, torchrun's agent passes SIGTERM on to both
    ranks and waits 30 s. Either way every rank stops after the same step, saves there, and ends."""
    out = tmp_path / "run"
    launcher = _launch(out, openmoji_small, tiny_vae, 2000, processes)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= 3 and "loss" in r for r in _log(out)) and time.time() < deadline:
        time.sleep(0.1)
    trainers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "training.train_ldm" in " ".join(p.cmdline())]
    assert len(trainers) == processes, launcher.stderr.read()[-2000:]
    launcher.send_signal(signal.SIGTERM)  # to the launcher only, as `kill PID` of the command would
    _, err = launcher.communicate(timeout=90)
    gone, alive = psutil.wait_procs(trainers, timeout=60)
    assert not alive  # no training process outlived the launcher
    (stopped,) = [r for r in _log(out) if r.get("event") == "stopped"]
    step = stopped["step"]
    assert stopped["signal"] == "SIGTERM" and 3 <= step < 2000
    said = re.findall(r"stopped by SIGTERM at step (\d+):", err)
    assert said == [str(step)] * processes, err[-3000:]  # every rank, one step
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"] and not (out / "pipeline").exists()

    for run in (out, tmp_path / "full"):  # relaunched: continues from the saved step; and a run never stopped
        proc = _launch(run, openmoji_small, tiny_vae, step + 2, processes)  # (constant LR after warm-up: max_steps does not change it)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert [r["event"] for r in _log(out) if "event" in r] == ["start", "stopped", "resume"]
    assert _same(unet_weights(out), unet_weights(tmp_path / "full"))


def test_a_signal_before_the_training_steps_stops_at_once_with_one_line(openmoji_small, tiny_vae, tmp_path, monkeypatch):
    import training.train_ldm as job

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(job, "build_latent_cache", interrupted)
    with pytest.raises(Stopped, match="stopped by SIGTERM before or after the training steps") as err:
        train(cfg_for(openmoji_small, tiny_vae, tmp_path / "run", "train.max_steps=2", *STEPS))
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the process's own handler is back


# ---- divergence ----------------------------------------------------------------------------------


def test_a_diverged_loss_stops_with_one_line_a_non_zero_exit_and_no_export(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train_ldm", "--config", str(TINY_LDM_CONFIG), f"data.path={openmoji_small}",
           f"model.vae={tiny_vae}", f"output_dir={out}", "train.lr=1e6", "train.max_steps=30",
           "train.checkpoint_every=1000", "model.check_images=0"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (line,) = [s for s in run.stderr.splitlines() if s.startswith("error:")]
    assert "the training loss is not finite at step" in line and "nothing was exported and there is no checkpoint" in line
    assert "Lower train.lr" in line and not (out / "pipeline").exists() and not (out / "metrics.json").exists()


def test_a_stage_1_run_that_diverges_exports_nothing(openmoji_small, tmp_path):
    from tests.conftest import TINY_AE_CONFIG
    from training.autoencoder_config import AutoencoderJobConfig
    from training.config import load_config
    from training.train_autoencoder import train as train_ae

    cfg = load_config(AutoencoderJobConfig, TINY_AE_CONFIG, [f"data.path={openmoji_small}", f"output_dir={tmp_path / 'ae'}",
                                                             "train.lr=1e8", "train.max_steps=20", "train.checkpoint_every=1000"])  # fmt: skip
    with pytest.raises(RunError, match="the training loss is not finite at step"):
        fresh_state(train_ae)(cfg)
    assert not (tmp_path / "ae" / "vae").exists()


def test_non_finite_weights_are_never_exported():
    from training.guard import check_finite

    net = torch.nn.Linear(2, 2)
    check_finite(net, "U-Net")
    with torch.no_grad():
        net.bias[0] = float("nan")
    with pytest.raises(RunError, match=r"1 tensors of the U-Net are not finite \(first: bias\); nothing was exported"):
        check_finite(net, "U-Net")


# ---- one line at every entry point ---------------------------------------------------------------


def test_a_folder_that_would_run_code_is_refused_by_generate_in_one_line(tmp_path, capsys):
    from ldm.generate import main

    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ["evil", "Evil"], "unet": ["evil", "Evil"]}))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "code" in err
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["training.train_ldm", "training.train_autoencoder"])
def test_a_missing_dataset_folder_is_one_line_from_each_training_command(entry, tmp_path, capsys):
    import importlib

    from tests.conftest import TINY_AE_CONFIG

    config = TINY_LDM_CONFIG if entry.endswith("ldm") else TINY_AE_CONFIG
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(entry).main(["--config", str(config), f"data.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == f"error: dataset folder '{tmp_path / 'nowhere'}' does not exist (data.path)\n"


def test_prepare_data_names_an_unwritable_output_in_one_line(openmoji_small, tmp_path, capsys):
    from training.prepare_data import main

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:  # --out under a file: the OS refuses the folder
        main(["parquet", "--src", str(openmoji_small), "--out", str(tmp_path / "a-file" / "sub" / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == f"error: Not a directory: {tmp_path / 'a-file' / 'sub'}\n"


# ---- the bf16 decision ---------------------------------------------------------------------------


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """runtime.hardware with a scripted probe, an empty per-boot cache and a CPU that has bf16 units."""
    from runtime import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LDM_CPU_BF16", raising=False)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    results: list[dict] = []
    calls = []
    monkeypatch.setattr(hardware, "_probe_speed", lambda: calls.append(1) or results.pop(0))
    hardware.bf16_decision.cache_clear()
    yield hardware, results, calls
    hardware.bf16_decision.cache_clear()


def test_a_probe_taken_under_load_is_used_once_and_not_kept(probe, monkeypatch):
    hardware, results, calls = probe
    monkeypatch.setattr(hardware, "_expected_fast", lambda: None)
    results += [{"speedup": 0.56, "spread": 0.4, "cpu_share": 0.35}, {"speedup": 1.9, "spread": 0.05, "cpu_share": 0.97}]
    speedup, how = hardware.bf16_decision()
    assert speedup == 0.56 and "the CPU was busy (probe got 35% of it): not kept" in how
    hardware.bf16_decision.cache_clear()  # the next process
    assert hardware.bf16_decision() == (1.9, "bf16 probe 1.90x")
    hardware.bf16_decision.cache_clear()
    assert hardware.bf16_decision()[1] == "bf16 probe 1.90x (measured earlier this boot)" and len(calls) == 2


def test_a_verdict_against_the_cpu_family_is_measured_again(probe, monkeypatch):
    hardware, results, calls = probe
    monkeypatch.setattr(hardware, "_expected_fast", lambda: True)  # e.g. an AMD EPYC with AVX512-BF16
    results += [{"speedup": 0.6, "spread": 0.5, "cpu_share": 0.9}, {"speedup": 2.2, "spread": 0.05, "cpu_share": 0.98}]
    assert hardware.bf16_decision()[0] == 2.2 and len(calls) == 2


def test_the_bf16_decision_can_be_overridden_and_the_run_says_why(probe, monkeypatch):
    from training.config import MixedPrecision

    hardware, _, calls = probe
    monkeypatch.setenv("LDM_CPU_BF16", "slow")
    assert MixedPrecision.auto.accelerate_name("cpu") == "no" and calls == []
    assert MixedPrecision.auto.reason("cpu") == "auto: LDM_CPU_BF16=slow (< 1.3x)"
    assert MixedPrecision.bf16.reason("cpu") == "train.mixed_precision=bf16"
