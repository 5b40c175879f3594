import dataclasses

import pytest

from tests.conftest import ROOT
from training.config import ConfigError, MixedPrecision, load_config, to_dict
from training.train_autoencoder import AutoencoderJobConfig

DEFAULT = ROOT / "configs" / "autoencoder" / "openmoji-32-f4.yaml"


def test_default_config_has_the_documented_keys():
    cfg = load_config(AutoencoderJobConfig, DEFAULT)
    flat = to_dict(cfg)
    for key in ("output_dir", "seed"):
        assert key in flat
    assert {"path", "resolution"} <= set(flat["data"])
    assert {"batch_size", "max_steps", "checkpoint_every", "mixed_precision"} <= set(flat["train"])
    assert cfg.data.resolution == 32 and cfg.model.preset == "f4-small"


def test_overrides_beat_the_file_and_are_typed():
    cfg = load_config(AutoencoderJobConfig, DEFAULT, ["train.max_steps=7", "train.mixed_precision=bf16", "data.path=/x", "seed=3"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.mixed_precision is MixedPrecision.bf16
    assert cfg.data.path == "/x" and cfg.seed == 3


def test_configs_are_frozen():
    cfg = load_config(AutoencoderJobConfig, DEFAULT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(AutoencoderJobConfig, DEFAULT, ["train.max_step=5"])
    msg = str(err.value)
    assert "train.max_step" in msg and "max_steps" in msg and "batch_size" in msg


def test_unknown_top_level_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("outptu_dir: x\n")
    with pytest.raises(ConfigError, match="outptu_dir.*output_dir"):
        load_config(AutoencoderJobConfig, bad)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(AutoencoderJobConfig, DEFAULT, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="train.mixed_precision.*fp8"):
        load_config(AutoencoderJobConfig, DEFAULT, ["train.mixed_precision=fp8"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(AutoencoderJobConfig, DEFAULT, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AutoencoderJobConfig, tmp_path / "nope.yaml")


def test_every_shipped_autoencoder_config_loads():
    for path in sorted((ROOT / "configs" / "autoencoder").glob("*.yaml")):
        load_config(AutoencoderJobConfig, path)
