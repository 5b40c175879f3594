"""A Stable-Diffusion-layout pipeline folder (diffusers) as one single-file checkpoint in the original (CompVis
latent-diffusion) key layout: the file AUTOMATIC1111, ComfyUI, sd-scripts and diffusers' ``from_single_file`` load.

diffusers owns the other direction (``diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint``) and its table of
the fixed keys (``DIFFUSERS_TO_LDM_MAPPING``); this is its inverse, and the tests check it as one: converting the file
back with diffusers' own functions gives every tensor of the folder, bit for bit.

    U-Net  (prefix model.diffusion_model.), with P = layers_per_block + 1:
      down_blocks.i.resnets.j            -> input_blocks.(P i + j + 1).0      resnet: norm1 in_layers.0, conv1 in_layers.2,
      down_blocks.i.attentions.j         -> input_blocks.(P i + j + 1).1        time_emb_proj emb_layers.1, norm2
      down_blocks.i.downsamplers.0.conv  -> input_blocks.(P (i + 1)).0.op       out_layers.0, conv2 out_layers.3,
      mid_block.resnets.j / attentions.0 -> middle_block.(2 j) / middle_block.1 conv_shortcut skip_connection
      up_blocks.i.resnets.j              -> output_blocks.(P i + j).0
      up_blocks.i.attentions.j           -> output_blocks.(P i + j).1
      up_blocks.i.upsamplers.0.conv      -> output_blocks.(P i + P - 1).(2 if the block has attentions, else 1).conv
    VAE    (prefix first_stage_model.), n levels:
      encoder.down_blocks.i.resnets.j    -> encoder.down.i.block.j             conv_shortcut nin_shortcut
      encoder.down_blocks.i.downsamplers.0 -> encoder.down.i.downsample
      decoder.up_blocks.i.resnets.j      -> decoder.up.(n - 1 - i).block.j
      decoder.up_blocks.i.upsamplers.0   -> decoder.up.(n - 1 - i).upsample
      *.mid_block.resnets.j / attentions.0 -> *.mid.block_(j + 1) / *.mid.attn_1   group_norm norm, to_q q, to_k k,
                                                                                 to_v v, to_out.0 proj_out (1x1 convs)
    text encoder (prefix cond_stage_model.transformer.text_model.): transformers' CLIPTextModel names (SD 1.x).

Only what those tools can load is written: a CLIP text encoder of OpenAI's kind (SD 1.x; SD 2.x keeps its OpenCLIP
encoder in another layout), a U-Net without class or added embeddings (SDXL has two encoders and added embeddings),
an epsilon-prediction DDPM model (they take every SD 1.x file as one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file

from runtime.errors import InputError

SD_SCALING_FACTOR = 0.18215  # what AUTOMATIC1111 and ComfyUI assume of an SD 1.x file's autoencoder
UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileError(InputError):
    """A folder this layout cannot hold; raised before anything is written."""


def _renamed(rest: str, names: dict[str, str]) -> str:
    """``rest`` ("norm1.weight", "to_out.0.bias") with its leading module renamed by ``names``."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key(key: str, config: dict) -> str:
    """The original name of a diffusers UNet2DConditionModel key (without the prefix)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    p = config["layers_per_block"] + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{p * i + j + 1}." + (f"0.{_renamed(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{p * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{p * i + j}." + (f"0.{_renamed(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        with_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{p * i + p - 1}.{2 if with_attention else 1}.conv.{m[2]}"
    raise SingleFileError(f"the U-Net weight '{key}' has no place in the Stable Diffusion single-file layout")


def vae_key(key: str, config: dict) -> str:
    """The original name of a diffusers AutoencoderKL key (without the prefix)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    n = len(config["up_block_types"])
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_renamed(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_renamed(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_renamed(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_renamed(m[2], VAE_ATTENTION)}"
    raise SingleFileError(f"the autoencoder weight '{key}' has no place in the Stable Diffusion single-file layout")


def _config(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def _config_file(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_convertible(folder: str | Path) -> None:
    """One line naming why ``folder`` cannot be a Stable Diffusion single file, before any weight is read."""
    folder = Path(folder)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise SingleFileError(f"'{folder}' has no {part}/config.json: expected a pipeline folder (diffusers layout)")
    if (folder / "text_encoder_2").is_dir():
        raise SingleFileError(
            f"'{folder}' is a Stable Diffusion XL folder: only SD 1.x-layout folders are written as one file "
            "(load the folder itself, diffusers layout)"
        )
    text = _config(folder, "text_encoder")
    if (
        "CLIPTextModel" not in text.get("architectures", ["CLIPTextModel"])
        or text.get("model_type", "clip_text_model") != "clip_text_model"
    ):
        raise SingleFileError(
            f"'{folder}' has a {text.get('model_type', 'non-CLIP')} text encoder; the Stable Diffusion single-file layout "
            "holds a CLIP text encoder (SD 1.x): export the folder itself (diffusers layout) instead"
        )
    if text.get("hidden_act") == "gelu":
        raise SingleFileError(
            f"'{folder}''s text encoder is OpenCLIP's (SD 2.x), which single files keep in OpenCLIP's own layout; "
            "only SD 1.x-layout folders are written (load the folder itself, or use diffusers' conversion script)"
        )
    scheduler = _config_file(folder / "scheduler" / "scheduler_config.json")
    if scheduler.get("use_flow_sigmas") or "FlowMatch" in scheduler.get("_class_name", ""):
        raise SingleFileError(
            f"'{folder}' is a flow-matching model: the tools that load SD single files sample it as DDPM; "
            "load the folder itself (diffusers layout)"
        )
    if (prediction := scheduler.get("prediction_type", "epsilon")) != "epsilon":
        raise SingleFileError(
            f"'{folder}' is a {prediction} model: the tools that load SD 1.x single files sample every one as epsilon "
            "(AUTOMATIC1111 reads v-prediction only from a .yaml beside the file, ComfyUI from a loader node), so it "
            "would draw wrong images there; load the folder itself (diffusers layout)"
        )
    vae = _config(folder, "vae")
    if vae.get("scaling_factor", SD_SCALING_FACTOR) != SD_SCALING_FACTOR or vae.get("shift_factor") not in (None, 0, 0.0):
        raise SingleFileError(
            f"'{folder}''s autoencoder has scaling_factor={vae.get('scaling_factor')} and shift_factor={vae.get('shift_factor')}; "
            f"a single file carries no such setting and the tools that load it assume SD's {SD_SCALING_FACTOR}: "
            "load the folder itself (diffusers layout)"
        )
    unet = _config(folder, "unet")
    extra = [k for k in ("addition_embed_type", "class_embed_type") if unet.get(k)]
    if extra:
        raise SingleFileError(
            f"'{folder}''s U-Net has {extra[0]}={unet[extra[0]]} (SDXL or an upscaler): not the SD 1.x single-file layout"
        )


def original_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of the folder's U-Net, autoencoder and text encoder under its original name."""
    folder = Path(folder)
    check_convertible(folder)
    unet, vae = _config(folder, "unet"), _config(folder, "vae")
    state = {}
    for key, value in load_file(str(_weights(folder, "unet"))).items():
        state[UNET_PREFIX + unet_key(key, unet)] = value
    for key, value in load_file(str(_weights(folder, "vae"))).items():
        name = vae_key(key, vae)
        is_attention = ".mid.attn_1." in name and value.ndim == 2  # a linear there, a 1x1 convolution in the original
        state[VAE_PREFIX + name] = value[:, :, None, None] if is_attention else value
    for key, value in load_file(str(_weights(folder, "text_encoder"))).items():  # transformers 5 names no text_model.
        state[CLIP_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return state


def _weights(folder: Path, part: str) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / part / name).is_file():
            return folder / part / name
    raise SingleFileError(f"'{folder / part}' holds no safetensors weights (sharded or .bin folders are not read)")


def save_single_file(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """``out``: the folder as one safetensors file in the original layout (``dtype``: e.g. fp16, as such files are
    usually shared; None keeps the folder's), written under a temporary name and renamed."""
    state = original_state_dict(folder)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
