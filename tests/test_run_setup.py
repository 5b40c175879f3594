"""training/run/setup.py: the run settings' rules, the cadence, resume-or-start, and the distributed configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate import Accelerator

from tests.conftest import ROOT, TINY_LDM_CONFIG, free_port, max_difference, no_traceback_of_ours

from training.config import ConfigError, load_config
from training.data.sampler import BatchStream
from training.ldm_config import LdmJobConfig, LdmTrainConfig
from training.run.setup import RunConfig, due, resume_or_start

ACCELERATE = Path(sys.executable).parent / "accelerate"


def test_periodic_actions_are_due_every_n_steps_and_at_the_end():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if due(s, 50, 3)] == [3]


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.cpu_threads=0", "train.cpu_threads=0 must be >= 1"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5 must be in (0, 1)"),
    ("train.lr_schedule=zigzag", "train.lr_schedule='zigzag' is unknown; valid: linear, cosine"),
    ("train.max_minutes=0", "train.max_minutes=0.0 must be > 0 (or null for no time budget)"),
    ("train.lr_decay_fraction=0.3", "train.lr_decay_fraction would be ignored: it is for train.lr_schedule=warmup_stable_decay"),
    ("train.lr_decay_fraction=0", "train.lr_decay_fraction=0.0 must be in (0, 1]"),
    ("train.ema.kind=karras", "train.ema.kind='karras' is unknown; valid: decay, posthoc"),
    ("train.optimizer=lion", "train.optimizer='lion' is unknown; valid: adamw, adafactor, prodigy, schedule_free_adamw, adamw_8bit"),
])  # fmt: skip
def test_both_jobs_share_the_rules_of_the_shared_settings(override, message):
    from training.autoencoder_config import AutoencoderJobConfig

    for schema in (AutoencoderJobConfig, LdmJobConfig):
        with pytest.raises(ConfigError) as err:
            load_config(schema, None, [override])
        assert message in str(err.value)


def test_each_job_keeps_its_own_defaults_of_the_shared_fields():
    from training.autoencoder_config import TrainConfig

    assert issubclass(TrainConfig, RunConfig) and issubclass(LdmTrainConfig, RunConfig)
    assert (TrainConfig().batch_size, LdmTrainConfig().batch_size) == (32, 64)
    assert (TrainConfig().lr_schedule, LdmTrainConfig().lr_schedule) == ("cosine", "constant_with_warmup")


def test_a_fresh_run_starts_from_the_given_state_and_writes_its_config(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # no public call: see conftest.fresh_state
    accelerator = Accelerator(cpu=True)
    cfg = load_config(LdmJobConfig, None, [f"output_dir={tmp_path / 'run'}"])
    layout = BatchStream(10, cfg.train.batch_size, cfg.seed, world_size=accelerator.num_processes).layout
    state = resume_or_start(accelerator, tmp_path / "run", cfg, layout, {"step": 0, "micro_batches": 0})
    assert state == {"step": 0, "micro_batches": 0} and layout["num_processes"] == 1
    assert (tmp_path / "run" / "config.yaml").is_file()
    AcceleratorState._reset_state(True)


# ---- the distributed configs ----------------------------------------------------------------------


def test_every_accelerate_config_loads_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {  # name: (distributed_type, processes, machines)
        "cpu-1": ("NO", 1, 1), "cpu-2": ("MULTI_GPU", 2, 1), "multi-gpu": ("MULTI_GPU", 8, 1),
        "fsdp": ("FSDP", 8, 1), "two-machines": ("MULTI_GPU", 16, 2),
    }  # fmt: skip
    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert sorted(f.stem for f in files) == sorted(expected)
    for f in files:
        cfg = load_config_from_file(str(f))
        assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines) == expected[f.stem], f
    assert load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2


def _tiny_stage_2(data, vae, out, cache, *extra) -> list[str]:
    """4 fp32 steps of the tiny config, one thread per process: its key=value overrides."""
    return [f"data.path={data}", f"model.vae={vae}", f"output_dir={out}", f"cache.dir={cache}", "train.max_steps=4",
            "train.checkpoint_every=4", "train.sample_every=100", "train.mixed_precision=fp32", "train.cpu_threads=1",
            "model.check_images=0", *extra]  # fmt: skip


def _launched(*overrides: str) -> list[str]:
    return ["-m", "training.train_ldm", "--config", str(TINY_LDM_CONFIG), *overrides]


def test_the_fsdp_config_is_refused_on_a_cpu_in_one_line(openmoji_small, tiny_vae, tmp_path):
    """accelerate itself would run it as plain DDP on a CPU, without a word."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
           *_launched(*_tiny_stage_2(openmoji_small, tiny_vae, tmp_path / "run", tmp_path / "cache"))]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and not (tmp_path / "cache").exists() and not (tmp_path / "run" / "checkpoints").exists()
    said = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 2 and said[0].startswith("error: FSDP (configs/accelerate/fsdp.yaml) shards a model across GPUs"), run.stderr[-3000:]
    assert no_traceback_of_ours(run.stderr)  # torchrun's own traceback only


def test_two_launches_as_two_machines_end_with_the_weights_of_one_machine(openmoji_small, tiny_vae, tmp_path):
    """configs/accelerate/two-machines.yaml on one machine: two `accelerate launch` commands with machine_rank 0 and
    1, one process each, 127.0.0.1 and a free port, one shared output_dir and cache (as on shared storage). The
    U-Net equals one process's with the global batch (2 ranks = 1 rank is tests/test_train_ldm.py's)."""
    from tests.conftest import fresh_state, unet_weights
    from training.train_ldm import train

    port, shared = free_port(), tmp_path / "two"
    launches = [
        subprocess.Popen([str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "two-machines.yaml"),
                          "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", str(port),
                          *_launched(*_tiny_stage_2(openmoji_small, tiny_vae, shared, tmp_path / "cache2", "train.batch_size=4"))],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in (0, 1)
    ]
    for launch in launches:
        _, err = launch.communicate(timeout=300)
        assert launch.returncode == 0, err[-3000:]
    log = [json.loads(line) for line in (shared / "log.jsonl").read_text().splitlines()]
    assert log[0]["processes"] == 2
    one = tmp_path / "one"
    overrides = _tiny_stage_2(openmoji_small, tiny_vae, one, tmp_path / "cache1", "train.batch_size=8")
    fresh_state(train)(load_config(LdmJobConfig, TINY_LDM_CONFIG, overrides))
    assert max_difference(unet_weights(shared), unet_weights(one)) < 1e-5
