"""Experiment trackers through accelerate (issue 16): TensorBoard event files whose scalars match
log.jsonl step for step, read back with TensorBoard's own reader, across a kill and resume."""

from __future__ import annotations

import json

import pytest

from runtime.errors import InputError
from tests.conftest import assert_same_scalars, autoencoder_cfg, event_images, event_scalars, fresh_state, jsonl_scalars, ldm_cfg
from training.run.tracking import hyperparameters, tracker_names
from training.train_autoencoder import train as train_autoencoder_job
from training.train_ldm import train as train_ldm_job

train_ldm, train_autoencoder = fresh_state(train_ldm_job), fresh_state(train_autoencoder_job)


def test_a_stage_2_run_killed_and_resumed_continues_the_same_curves_each_step_once(openmoji_small, tiny_vae, tmp_path):
    steps = ["train.max_steps=8", "train.log_every=1", "train.checkpoint_every=3", "train.sample_every=4", "model.check_images=0"]
    full, out = tmp_path / "full", tmp_path / "run"
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, full, *steps))
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, out, *steps), stop_after_steps=5)  # killed after step 5: checkpoint 3
    assert [s for s, _ in event_scalars(out, "train_ldm")["loss"]] == [1, 2, 3, 4, 5]
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, out, *steps))  # resumes at 3: steps 4 and 5 are trained again

    logged = assert_same_scalars(out, "train_ldm")
    assert [s for s, _ in logged["loss"]] == list(range(1, 9))  # not from 0, no step twice
    assert logged["loss"] == jsonl_scalars(full)["loss"]  # the uninterrupted run's curve (exact resume)
    assert {"loss", "lr", "images_per_s"} <= logged.keys()
    assert event_images(out, "train_ldm")["samples"] == [(4, 2 * 2 * 32, 2 * 2 * 32), (8, 2 * 2 * 32, 2 * 2 * 32)]  # 2x2 grid, x2
    resumes = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"event"' in line]
    assert [r["event"] for r in resumes] == ["start", "resume"] and resumes[1]["step"] == 3


def test_a_stage_1_run_logs_its_losses_held_out_psnr_and_reconstructions(openmoji_small, tmp_path):
    out = tmp_path / "run"
    train_autoencoder(autoencoder_cfg(openmoji_small, out, "train.max_steps=6", "train.checkpoint_every=2"), stop_after_steps=4)
    train_autoencoder(autoencoder_cfg(openmoji_small, out, "train.max_steps=6", "train.checkpoint_every=2"))
    logged = assert_same_scalars(out, "train_autoencoder")
    assert {"l1", "lpips", "kl", "lr", "images_per_s", "bad_images", "val_psnr"} <= logged.keys()
    assert [s for s, _ in logged["l1"]] == [2, 4, 6]
    assert [step for step, _, _ in event_images(out, "train_autoencoder")["reconstructions"]] == [4, 6]  # every 4 and at the end


def test_the_run_config_is_recorded_as_hyperparameters(openmoji_small, tiny_vae, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", "train.max_steps=2", "model.check_images=0")
    train_ldm(cfg)
    (events_file,) = (tmp_path / "run" / "logs" / "train_ldm").glob("*/events.out.tfevents.*")  # add_hparams' own run
    folder = events_file.parent
    events = EventAccumulator(str(folder)).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.max_steps"].number_value == 2 and hparams["model.unet"].string_value == "tiny"
    assert hparams["sample.prompts"].string_value == json.dumps(list(cfg.sample.prompts))
    assert hyperparameters(cfg)["train.lr"] == cfg.train.lr


def test_report_to_none_writes_no_event_files_and_log_jsonl_stays(openmoji_small, tiny_vae, tmp_path):
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", "train.max_steps=2", "train.report_to=none", "model.check_images=0"))
    assert not (tmp_path / "run" / "logs").exists() and jsonl_scalars(tmp_path / "run")["loss"]


def test_report_to_names_an_unknown_or_missing_tracker_before_any_work(openmoji_small, tiny_vae, tmp_path):
    assert tracker_names("auto") == ["tensorboard"] and tracker_names("none") == [] and "tensorboard" in tracker_names("all")
    with pytest.raises(InputError, match="train.report_to: unknown tracker 'tensorbored'; valid: auto, none, all, or any of .*wandb"):
        ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", "train.report_to=tensorbored")
    from accelerate.utils import LoggerType

    missing = next(t.value for t in LoggerType if t.value not in ("all", *tracker_names("all")))  # wandb here: not a dependency
    with pytest.raises(InputError, match=f"train.report_to: '{missing}' is not installed; pip install {missing}, or choose none"):
        ldm_cfg(openmoji_small, tiny_vae, tmp_path / "run", f"train.report_to=tensorboard,{missing}")
    assert not (tmp_path / "run").exists()


def test_a_relaunch_with_no_checkpoint_and_a_torn_last_line_shows_each_step_once(openmoji_small, tiny_vae, tmp_path):
    steps = ["train.max_steps=4", "train.log_every=1", "train.checkpoint_every=100", "train.sample_every=100", "model.check_images=0"]
    out = tmp_path / "run"
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, out, *steps), stop_after_steps=3)  # killed before any checkpoint
    with open(out / "log.jsonl", "a") as f:
        f.write('{"time": 1, "step": 4, "lo')  # a line cut short by the kill
    train_ldm(ldm_cfg(openmoji_small, tiny_vae, out, *steps))  # starts again from step 0
    logged = assert_same_scalars(out, "train_ldm")
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4]
