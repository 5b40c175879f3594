"""training/run/setup.py: the run settings' rules, the cadence, resume-or-start."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from training.config import ConfigError, load_config
from training.data.sampler import BatchStream
from training.ldm_config import LdmJobConfig, LdmTrainConfig
from training.run.setup import RunConfig, due, resume_or_start


def test_periodic_actions_are_due_every_n_steps_and_at_the_end():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if due(s, 50, 3)] == [3]


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.cpu_threads=0", "train.cpu_threads=0 must be >= 1"),
    ("train.ema_decay=1.5", "train.ema_decay=1.5 must be in (0, 1)"),
    ("train.lr_schedule=zigzag", "train.lr_schedule='zigzag' is unknown; valid: linear, cosine"),
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

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    cfg = load_config(LdmJobConfig, None, [f"output_dir={tmp_path / 'run'}"])
    layout = BatchStream(10, cfg.train.batch_size, cfg.seed, world_size=accelerator.num_processes).layout
    state = resume_or_start(accelerator, tmp_path / "run", cfg, layout, {"step": 0, "micro_batches": 0})
    assert state == {"step": 0, "micro_batches": 0} and layout["num_processes"] == 1
    assert (tmp_path / "run" / "config.yaml").is_file()
    AcceleratorState._reset_state(True)
