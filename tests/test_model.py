import json

import pytest
import torch

from autoencoder import (
    AUTOENCODER_PRESETS,
    build_autoencoder,
    downsampling_factor,
    load_autoencoder,
    save_autoencoder,
    set_latent_normalization,
)


@pytest.mark.parametrize("preset,factor", [("tiny", 4), ("f4-small", 4), ("f4-narrow", 4), ("f4", 4), ("f8-small", 8), ("f8", 8)])
def test_presets_have_their_downsampling_and_4_latent_channels(preset, factor):
    assert AUTOENCODER_PRESETS[preset]["latent_channels"] == 4
    if preset in ("f4", "f8"):  # large: check the spec without building
        assert 2 ** (len(AUTOENCODER_PRESETS[preset]["block_out_channels"]) - 1) == factor
        return
    vae = build_autoencoder(preset, 32)
    assert downsampling_factor(vae) == factor
    z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 4, 32 // factor, 32 // factor)


def test_bad_preset_and_resolution_are_named():
    with pytest.raises(ValueError, match="model.preset='f5'.*tiny"):
        build_autoencoder("f5", 32)
    with pytest.raises(ValueError, match="data.resolution=30.*4"):
        build_autoencoder("tiny", 30)


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_autoencoder("tiny", 16).eval()
    set_latent_normalization(vae, 0.37, None)
    save_autoencoder(vae, tmp_path / "vae")
    save_autoencoder(vae, tmp_path / "vae")  # replacing an existing export works
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_autoencoder(tmp_path / "vae").eval()
    assert loaded.config.scaling_factor == pytest.approx(0.37)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = vae.decode(vae.encode(x).latent_dist.mode()).sample
        b = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    assert torch.equal(a, b)
    assert not list(tmp_path.glob(".vae-*"))  # no temporary folders left behind


def test_loading_something_that_is_not_an_autoencoder(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel, not an AutoencoderKL"):
        load_autoencoder(tmp_path)
