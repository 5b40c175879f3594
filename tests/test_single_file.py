"""ldm/single_file.py and ``python -m training.export single-file``: an SD-layout folder as one file in the original
key layout, checked against diffusers' own converters and its ``from_single_file`` (offline, the folder as config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file

from tests.conftest import tiny_pipeline
from training.export import main as export_main


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable-Diffusion-layout folder whose U-Net has SD 1.x's structure in small: two ResNets a level, a
    cross-attention level, a plain level (its upsampler then sits at index 1, not 2)."""
    parts = tiny_pipeline("clip", seed=3).components
    torch.manual_seed(3)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=parts["vae"].config.latent_channels, out_channels=parts["vae"].config.latent_channels,
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=parts["text_encoder"].config.hidden_size,
        attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    parts["vae"].register_to_config(scaling_factor=0.18215, shift_factor=None)  # SD's, which the tools assume
    folder = tmp_path_factory.mktemp("sd") / "sd"
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_diffusers_own_converters_give_back_every_weight_of_the_folder(sd_folder, tmp_path):
    export_main(["single-file", "--model", str(sd_folder), "--out", str(tmp_path / "model.safetensors")])
    checkpoint = load_file(str(tmp_path / "model.safetensors"))
    # names as SD 1.5's file has them (diffusers' converter also accepts an upsampler at .1 or .2; AUTOMATIC1111 does not)
    for key in ("input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.3.0.op.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.3.0.skip_connection.weight",
                "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight", "time_embed.0.weight"):  # fmt: skip
        assert "model.diffusion_model." + key in checkpoint, key
    for key in ("first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
                "first_stage_model.decoder.mid.block_2.conv2.weight", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):  # fmt: skip
        assert key in checkpoint, key
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 convolution, as the original
    unet = UNet2DConditionModel.load_config(sd_folder / "unet")
    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, unet),
        "vae": convert_ldm_vae_checkpoint(checkpoint, AutoencoderKL.load_config(sd_folder / "vae")),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }  # transformers 5 saves CLIPTextModel without the text_model. that SD 1.x files (and so this one) have
    for part, converted in back.items():
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        original = load_file(str(sd_folder / part / name))
        assert set(converted) == set(original), (part, set(converted) ^ set(original))
        assert all(torch.equal(converted[k], original[k]) for k in original), part


def test_from_single_file_offline_makes_the_folders_image_and_fp16_halves_the_file(sd_folder, tmp_path):
    out = tmp_path / "model.safetensors"
    export_main(["single-file", "--model", str(sd_folder), "--out", str(out)])
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(sd_folder), local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)  # fmt: skip
    folder = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    images = [
        pipe("red apple", num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        for pipe in (folder, loaded)
    ]
    assert np.abs(images[0] - images[1]).max() < 1e-5 and images[0].std() > 0

    export_main(["single-file", "--model", str(sd_folder), "--out", str(tmp_path / "half.safetensors"), "--dtype", "fp16"])
    half = load_file(str(tmp_path / "half.safetensors"))
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * out.stat().st_size


@pytest.mark.parametrize("change,message", [
    ("minilm", "holds a CLIP text encoder (SD 1.x)"),
    ("scaling", "scaling_factor=0.5 and shift_factor=None"),
    ("flow", "is a flow-matching model"),
    ("v_prediction", "is a v_prediction model: the tools that load SD 1.x single files sample every one as epsilon"),
])  # fmt: skip
def test_a_folder_the_layout_cannot_hold_is_one_line(change, message, sd_folder, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "folder"
    if change == "minilm":
        tiny_pipeline("minilm").save_pretrained(folder)  # this project's own models: not a CLIP text encoder
    else:
        shutil.copytree(sd_folder, folder)
        part, key, value = {"scaling": ("vae/config.json", "scaling_factor", 0.5),
                            "flow": ("scheduler/scheduler_config.json", "use_flow_sigmas", True),
                            "v_prediction": ("scheduler/scheduler_config.json", "prediction_type", "v_prediction")}[change]  # fmt: skip
        config = json.loads((folder / part).read_text())
        (folder / part).write_text(json.dumps({**config, key: value}))
    capsys.readouterr()  # the loading bars of the lines above
    with pytest.raises(SystemExit) as stop:
        export_main(["single-file", "--model", str(folder), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "x.safetensors").exists()
