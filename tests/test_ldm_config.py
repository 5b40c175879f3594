"""The stage-2 schema: every shipped YAML loads and passes its rules; keys that would be ignored are errors."""

import pytest

from tests.conftest import ROOT, TINY_LDM_CONFIG
from training.autoencoder_config import validate as validate_autoencoder
from training.config import ConfigError, load_config
from training.ldm_config import LdmJobConfig, text_encoder_trains, validate
from training.train_autoencoder import AutoencoderJobConfig

SCHEMAS = {"autoencoder": (AutoencoderJobConfig, validate_autoencoder), "ldm": (LdmJobConfig, validate), "finetune": (LdmJobConfig, validate)}


@pytest.mark.parametrize("path", sorted(p for d in SCHEMAS for p in (ROOT / "configs" / d).glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_with_its_schema_and_passes_its_rules(path):
    schema, rules = SCHEMAS[path.parent.name]
    rules(load_config(schema, path))


def error(*overrides: str, base=TINY_LDM_CONFIG) -> str:
    with pytest.raises(ConfigError) as err:
        validate(load_config(LdmJobConfig, base, list(overrides)))
    return str(err.value)


def test_finetune_method_and_init_from_go_together():
    assert "needs finetune.method=full" in error("model.init_from=runs/x/pipeline")
    assert "finetune.method=lora needs model.init_from" in error("finetune.method=lora")
    assert "finetune.method=full needs model.init_from" in error("finetune.method=full")
    assert "unknown; valid: none, full, lora" in error("finetune.method=partial")
    validate(load_config(LdmJobConfig, None, ["model.init_from=runs/x/pipeline", "finetune.method=lora"]))  # the valid pair


def test_keys_that_init_from_would_ignore_are_named():
    msg = error("model.init_from=runs/x/pipeline", "finetune.method=full", "model.unet=base", "model.prediction_type=v_prediction", base=None)
    assert "model.unet, model.prediction_type would be ignored" in msg and "model.replace_vae" in msg
    msg = error("model.init_from=runs/x/pipeline", "finetune.method=full", "model.prediction_type=v_prediction",
                "objective.zero_terminal_snr=true", base=None)  # the pipeline's own schedule is used  # fmt: skip
    assert "model.prediction_type, objective.zero_terminal_snr would be ignored" in msg


def test_text_keys_that_nothing_would_read_are_named():
    assert "train.text_lr=0.001 would be ignored" in error("model.text_encoder=minilm", "train.text_lr=1e-3")
    assert "finetune.train_text_encoder would be ignored" in error("finetune.train_text_encoder=true")
    ok = load_config(LdmJobConfig, TINY_LDM_CONFIG, ["model.text_encoder=clip-scratch", "train.text_lr=1e-3"])
    validate(ok)
    assert text_encoder_trains(ok)
    tuned = load_config(LdmJobConfig, None, ["model.init_from=runs/x/pipeline", "finetune.method=full", "finetune.train_text_encoder=true",
                                            "train.text_lr=1e-4"])  # fmt: skip
    validate(tuned)
    assert text_encoder_trains(tuned)


def test_each_objectives_keys_are_refused_under_the_other_and_its_names_are_checked():
    assert "objective.shift would be ignored: it is for objective.type=flow, and this run's is ddpm" in error("objective.shift=3")
    assert "objective.min_snr_gamma would be ignored: it is for objective.type=ddpm" in error("objective.type=flow", "objective.min_snr_gamma=1")
    assert "with objective.type=flow the U-Net predicts the velocity" in error("objective.type=flow", "model.prediction_type=v_prediction")
    assert "valid: ddpm, flow" in error("objective.type=rectified")
    assert "valid: uniform, logit_normal, mode" in error("objective.type=flow", "objective.timesteps=cosine")
    assert "valid: none, sigma_sqrt, cosmap" in error("objective.type=flow", "objective.weighting=snr")
    validate(load_config(LdmJobConfig, TINY_LDM_CONFIG, ["objective.type=flow", "objective.timesteps=mode", "objective.shift=3"]))
    # a DDPM term switched off is no conflict: a DDPM config (min_snr_gamma: 5) turned to flow can say min_snr_gamma=null
    validate(load_config(LdmJobConfig, TINY_LDM_CONFIG, ["objective.type=flow", "objective.min_snr_gamma=null"]))
