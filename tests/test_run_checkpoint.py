"""training/run/checkpoint.py: a damaged newest checkpoint is skipped for the older one, none that
verifies is an error, and a full disk or a read-only folder is one line that keeps the last checkpoint."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime.errors import RunError
from tests.conftest import FAST_STEPS, fresh_state, ldm_cfg, same_weights, unet_weights
from training.train_ldm import train as train_job

train = fresh_state(train_job)


@pytest.fixture(scope="module")
def uninterrupted(openmoji_small, tiny_vae, tmp_path_factory) -> dict:
    """The EMA U-Net of a 6-step run that nothing interrupted."""
    out = tmp_path_factory.mktemp("faults") / "full"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS))
    return unet_weights(out)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one_and_the_run_ends_the_same(openmoji_small, tiny_vae, uninterrupted,
                                                                                             tmp_path, capsys):  # fmt: skip
    out = tmp_path / "run"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS), stop_after_steps=4)  # checkpoints 2 and 4
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk or a bad copy
    capsys.readouterr()
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS))
    said = capsys.readouterr().out
    assert "skipping the damaged checkpoint" in said and "step-00000004: model.safetensors has" in said
    assert "resuming from the older checkpoint step-00000002" in said
    assert same_weights(unet_weights(out), uninterrupted)


def test_no_checkpoint_that_verifies_is_an_error_naming_each_never_a_restart_from_step_0(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS), stop_after_steps=4)
    (out / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    optimizer = out / "checkpoints" / "step-00000004" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size, other bytes
    with pytest.raises(RunError, match=r"no checkpoint .* can be resumed \(step-00000004: optimizer.bin does not match its SHA-256; "
                                       r"step-00000002: it has no manifest.json"):  # fmt: skip
        train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS))


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
        train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # the half-written one is gone
    monkeypatch.setattr(Accelerator, "save_state", real)
    train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=6", *FAST_STEPS))
    assert same_weights(unet_weights(out), uninterrupted)


def _usage(total: int, used: int, free: int):
    """What shutil.disk_usage returns (a named tuple whose class shutil does not export)."""
    from collections import namedtuple

    return namedtuple("usage", "total used free")(total, used, free)


def test_a_torch_write_failure_on_a_full_disk_is_named_as_one(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'."""
    import shutil

    from training.run.checkpoint import _writing

    def torch_fails():
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5888 vs 5776")

    (tmp_path / "checkpoints" / ".tmp-step-00000008").mkdir(parents=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(RunError, match=r"step-00000008 .*no space left on the device \(1 MiB free\); no earlier checkpoint exists"):
        _writing(torch_fails, tmp_path / "checkpoints" / ".tmp-step-00000008", tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(10 << 30, 0, 10 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not a disk problem: the traceback stays
        _writing(torch_fails, tmp_path / "checkpoints" / ".tmp-step-00000008", tmp_path)


@contextmanager
def read_only(folder: Path):
    """``folder`` made read-only by what this machine allows: its mode for a user; for root (whom modes do not
    stop) the immutable attribute, else a read-only tmpfs mounted over it. Yields the errno a write there gets.
    Skips, saying why, where none works (root without CAP_LINUX_IMMUTABLE nor CAP_SYS_ADMIN, as in a default
    Docker container, or a temp dir on a file system without the attribute, as tmpfs)."""
    folder.mkdir(parents=True)
    undo, tried = None, []
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:
        for make, unmake in ((["chattr", "+i"], ["chattr", "-i"]), (["mount", "-t", "tmpfs", "-o", "ro", "tmpfs"], ["umount"])):
            try:
                done = subprocess.run([*make, str(folder)], capture_output=True, text=True)
            except OSError as err:  # the tool is not installed
                tried.append(f"{make[0]}: {err.strerror}")
                continue
            if done.returncode == 0:
                undo = lambda unmake=unmake: subprocess.run([*unmake, str(folder)], check=True)  # noqa: E731
                break
            tried.append(f"{' '.join(make)}: {(done.stderr.strip().splitlines() or ['exit status %d' % done.returncode])[-1]}")
    if undo is None:
        pytest.skip(f"this machine offers root no way to make {folder} read-only ({'; '.join(tried)})")
    try:
        try:
            (folder / "probe").mkdir()
        except OSError as err:
            yield err.errno
        else:  # a file system that takes the attribute and ignores it
            pytest.skip(f"{folder} is still writable once made read-only on this machine")
    finally:
        undo()


def test_a_read_only_checkpoints_folder_is_one_line_before_any_half_written_checkpoint(openmoji_small, tiny_vae, tmp_path):
    out = tmp_path / "run"
    with read_only(out / "checkpoints") as code:
        name = errno.errorcode[code]
        with pytest.raises(RunError, match=rf"could not write the checkpoint step-00000002 in {out / 'checkpoints'}: .*\({name}: "
                                           r".*\.tmp-step-00000002\); no earlier checkpoint exists\. Free space \(or fix the folder's "
                                           r"permissions\) and relaunch"):  # fmt: skip
            train(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=4", *FAST_STEPS))
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "pipeline").exists()
