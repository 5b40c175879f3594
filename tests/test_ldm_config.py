"""The stage-2 schema: every shipped YAML loads and passes its rules; keys that would be ignored are errors."""

import pytest

from tests.conftest import ROOT, TINY_LDM_CONFIG
from training.autoencoder_config import validate as validate_autoencoder
from training.config import ConfigError, load_config
from training.ldm_config import LdmJobConfig, text_encoder_trains, validate, with_objective
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


@pytest.mark.parametrize("name", ["lora-openmoji", "full-openmoji", "lora-sdxl"])
def test_a_fine_tune_takes_its_folders_objective_and_refuses_only_an_explicit_other_one(name):
    """The shipped fine-tune configs set no objective type or shift: a DDPM folder fine-tunes as DDPM (min-SNR 5, the
    default), a flow folder as flow with its own shift; an explicit conflicting objective.type or shift is one line.
    A new U-Net's unset ones are ddpm, and 1.0 for flow."""
    path = ROOT / "configs" / "finetune" / f"{name}.yaml"
    shipped = load_config(LdmJobConfig, path)
    assert (shipped.objective.type, shipped.objective.shift) == (None, None)
    src = shipped.model.init_from
    ddpm, flow = with_objective(shipped, "ddpm", None, src).objective, with_objective(shipped, "flow", 3.0, src).objective
    assert (ddpm.type, ddpm.shift, ddpm.min_snr_gamma) == ("ddpm", None, 5.0) and (flow.type, flow.shift) == ("flow", 3.0)

    def refused(kind, shift, *overrides):
        with pytest.raises(ConfigError) as err:
            with_objective(load_config(LdmJobConfig, path, list(overrides)), kind, shift, src)
        return str(err.value)

    assert "objective.type=ddpm: model.init_from=" in refused("flow", 3.0, "objective.type=ddpm")
    assert "was trained with objective.type=ddpm, which fine-tuning keeps" in refused("ddpm", None, "objective.type=flow")
    assert "objective.shift=2.0: model.init_from=" in refused("flow", 3.0, "objective.shift=2.0")
    assert "objective.shift would be ignored: it is for objective.type=flow, and this run's is ddpm" in refused("ddpm", None, "objective.shift=2")
    assert "objective.min_snr_gamma would be ignored" in refused("flow", 1.0, "objective.min_snr_gamma=1")
    same = with_objective(load_config(LdmJobConfig, path, ["objective.type=flow", "objective.shift=3.0"]), "flow", 3.0, src).objective
    assert (same.type, same.shift) == ("flow", 3.0)  # explicit and equal to the folder's: no conflict
    new = load_config(LdmJobConfig, TINY_LDM_CONFIG)
    assert (with_objective(new).objective.type, with_objective(new).objective.shift) == ("ddpm", None)
    flow_new = with_objective(load_config(LdmJobConfig, TINY_LDM_CONFIG, ["objective.type=flow"])).objective
    assert (flow_new.type, flow_new.shift) == ("flow", 1.0)
