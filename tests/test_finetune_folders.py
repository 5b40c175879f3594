"""Fine-tuning the folders users have: an fp16 Stable Diffusion folder (the common case), a LoRA run's checkpoints
(the adapters and their optimizer state, not the frozen U-Net), and the kohya-layout file's key names checked against
the names ComfyUI and AUTOMATIC1111 look adapters up by (their conventions written out here, not our converter's)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import ROOT, fresh_state, logged, tiny_pipeline, write_imagefolder
from training.config import RunError, load_config
from training.ldm_config import LdmJobConfig
from training.train_ldm import train as train_job

train = fresh_state(train_job)
CAPTION = "a sks pattern"
ADAPTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")  # the text LoRA's targets

# ComfyUI's LORA_CLIP_MAP (comfy/lora.py): a CLIP module's name in a kohya file -> its name in the checkpoint
COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}  # fmt: skip


def a1111_compvis_name(key: str) -> str:
    """AUTOMATIC1111's ``convert_diffusers_name_to_compvis`` (extensions-builtin/Lora) for the modules a LoRA here
    adapts: a kohya module name -> the name of the SD 1.x module it patches (dots as underscores)."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_1_{m[2]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """A tiny Stable Diffusion 1.x-shaped folder saved in fp16, as most SD folders users have are: a CLIP text
    encoder, a U-Net with SD's two ResNets a level (so A1111's block arithmetic applies), SD's scaling factor."""
    parts = tiny_pipeline("clip", seed=5).components
    torch.manual_seed(5)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=parts["text_encoder"].config.hidden_size, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    parts["vae"].register_to_config(scaling_factor=0.18215, shift_factor=None)
    folder = tmp_path_factory.mktemp("fp16") / "sd"
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.to(torch.float16).save_pretrained(folder)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    pics = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(8)}
    return write_imagefolder(tmp_path_factory.mktemp("images") / "sks", pics)


def tune(folder, data, out, method: str, *overrides):
    return load_config(LdmJobConfig, ROOT / "configs" / "finetune" / f"{method}-openmoji.yaml", [
        f"model.init_from={folder}", f"data.path={data}", f"output_dir={out}", f"data.caption={CAPTION}",
        "train.sample_every=1000", "model.check_images=0", "train.batch_size=4", "train.lr=1e-2", *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(fp16_folder, images, tmp_path_factory):
    """LoRA on the U-Net and the text encoder of the fp16 folder, 4 steps, a checkpoint every 2 (the combination that
    crashed at step 1 when the encoder kept the file's fp16)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train(tune(fp16_folder, images, out, "lora", *LORA_STEPS))
    return out


LORA_STEPS = ["finetune.train_text_encoder=true", "finetune.lora_target_modules=[to_q,to_k,to_v,to_out.0]",
              "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1"]  # fmt: skip


@pytest.mark.parametrize("method,text", [("lora", False), ("full", True)])
def test_an_fp16_stable_diffusion_folder_fine_tunes_with_and_without_its_text_encoder(method, text, fp16_folder, images, tmp_path):
    """The text encoder loads in float32 as the U-Net does, whatever the folder's files hold (transformers keeps a
    file's fp16): with it training (LoRA, the module fixture; full, here) or frozen, the run steps and exports a folder
    diffusers loads. Before, LoRA on the encoder stopped at step 1 (Half != float) and a frozen one ran in fp16."""
    from training.stage2.models import load_models

    cfg = tune(fp16_folder, images, tmp_path / "run", method, f"finetune.train_text_encoder={text}", "train.max_steps=2",
               "train.checkpoint_every=2", "train.log_every=1")  # fmt: skip
    models = load_models(cfg)
    assert {p.dtype for p in models.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in models.unet.parameters()} == {torch.float32}
    train(cfg)
    losses = [r["loss"] for r in logged(tmp_path / "run", "loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", safety_checker=None, requires_safety_checker=False)
    image = sd(CAPTION, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_lora_checkpoint_holds_the_adapters_and_their_optimizer_state_and_resumes_exactly(lora_run, fp16_folder, images, tmp_path):
    """A LoRA run's checkpoint holds only what trains (the adapters on the U-Net and the text encoder) and the
    optimizer state of those, not the frozen fp32 U-Net; killed after step 2 and relaunched, the LoRA file is the
    uninterrupted run's bit for bit. A relaunch with other adapters is one line, not a silent half-load."""
    ckpt = lora_run / "checkpoints" / "step-00000004"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        held = set(f.keys())
    assert held and all(".lora_A." in k or ".lora_B." in k for k in held), sorted(held)[:5]
    assert {k.split(".")[0] for k in held} == {"unet", "text_encoder"}
    unet_adapters = [k for k in held if k.startswith("unet.")]
    text_adapters = [k for k in held if k.startswith("text_encoder.")]
    layers = json.loads((fp16_folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert len(text_adapters) == 2 * len(ADAPTED) * layers  # A and B of q, k, v, out in every layer
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len(held)  # one state per trained tensor
    unet_file = (fp16_folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # fp16: half its fp32 size
    assert (ckpt / "model.safetensors").stat().st_size < 0.15 * unet_file and len(unet_adapters) > 0

    out = tmp_path / "resumed"
    train(tune(fp16_folder, images, out, "lora", *LORA_STEPS), stop_after_steps=2)
    train(tune(fp16_folder, images, out, "lora", *LORA_STEPS))
    a, b = (load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")) for run in (lora_run, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in logged(out, "loss")] == [r["loss"] for r in logged(lora_run, "loss")]

    other = tmp_path / "other"
    train(tune(fp16_folder, images, other, "lora", *LORA_STEPS), stop_after_steps=2)
    with pytest.raises(RunError, match="cannot resume .*step-00000002: it lacks \\d+ weights this run trains .*other model or LoRA settings"):
        train(tune(fp16_folder, images, other, "lora", *LORA_STEPS, "finetune.lora_target_modules=[to_q,to_k,to_v,to_out.0,proj_in]"))


def test_the_kohya_file_names_its_adapters_as_comfyui_and_automatic1111_look_them_up(lora_run, fp16_folder, tmp_path):
    """Every adapter of lora_kohya.safetensors, the U-Net's and the text encoder's, is found by ComfyUI's key map
    (``lora_unet_`` + the diffusers module with dots as underscores; ``lora_te_text_model_encoder_layers_{n}_{module}``
    for SD 1.x's CLIP, built from the single file's ``cond_stage_model.transformer.text_model.*`` weights) and by
    AUTOMATIC1111's name conversion onto the SD 1.x modules of the same single file. Before, the text encoder's were
    written ``lora_te1_encoder_layers_*``: ComfyUI and A1111 skipped all of them (diffusers' loader, which the other tests
    use, reads either)."""
    from ldm.single_file import original_state_dict

    kohya = load_file(str(lora_run / "lora" / "lora_kohya.safetensors"))
    modules = {k.split(".")[0] for k in kohya}
    assert all(re.fullmatch(r"[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya), sorted(kohya)[:4]
    assert all({f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= kohya.keys() for m in modules)

    single = original_state_dict(lora_run / "pipeline")  # the single-file export of the fused pipeline
    comfy = {}  # ComfyUI's model_lora_keys_unet / model_lora_keys_clip, for this checkpoint
    unet = UNet2DConditionModel.from_pretrained(fp16_folder / "unet")
    for k in unet.state_dict():
        if k.endswith(".weight"):
            comfy["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
    for k in single:
        if m := re.fullmatch(r"cond_stage_model\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.weight", k):
            if m[2] in COMFY_CLIP:
                comfy[f"lora_te_text_model_encoder_layers_{m[1]}_{COMFY_CLIP[m[2]]}"] = k
    assert modules <= comfy.keys(), sorted(modules - comfy.keys())[:4]
    text = {m for m in modules if m.startswith("lora_te_")}
    layers = json.loads((fp16_folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert len(text) == len(ADAPTED) * layers and len(modules - text) > 0

    # A1111 names the SD 1.x model's modules by their dotted names with underscores (the single file's, less the
    # "model." / "cond_stage_model." of the checkpoint) and converts a kohya name onto them
    a1111 = {re.sub(r"^(model_|cond_stage_model_)", "", k.rsplit(".", 1)[0].replace(".", "_")) for k in single}
    assert all(a1111_compvis_name(m) in a1111 for m in modules), sorted(m for m in modules if a1111_compvis_name(m) not in a1111)[:4]
