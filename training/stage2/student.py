"""The models of a distillation run: the frozen teacher (a pipeline folder), the consistency student made from
it, and the student's export (a pipeline folder whose scheduler is LCM's, or LoRA adapters on the teacher)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from autoencoder import load_autoencoder
from ldm.consistency import GUIDANCE_EMBEDDING_DIM, DDPMConsistency, FlowConsistency
from ldm.diffusion import training_scheduler_of
from ldm.folders import check_pipeline_folder, is_xl_index, write_sampling
from ldm.schedulers import flow_shift, is_flow
from training.config import ConfigError
from training.distill_config import DistillConfig
from training.ldm_config import FinetuneConfig
from training.stage2.finetune import add_lora, export_lora, fused_lora_pipeline
from training.stage2.models import Models, folder_text
from training.stage2.samples import pipeline_of


class StudentForward(torch.nn.Module):
    """What a distillation step trains, as one ``forward`` (DDP synchronises what runs through it): the student U-Net,
    with the guidance embedding for a full LCM student. Returns its raw output (the teacher's kind: v, eps or v)."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, states, mask=None, timestep_cond=None):
        return self.unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask, timestep_cond=timestep_cond).sample


def load_teacher(folder: str) -> Models:
    """Every component of the teacher's pipeline folder, frozen; its text encoder's caption states go into the cache."""
    if is_xl_index(check_pipeline_folder(folder)):
        raise ConfigError(f"teacher {folder} is a Stable Diffusion XL folder; distillation takes SD-layout teachers only")
    root = Path(folder)
    vae = load_autoencoder(root / "vae").eval().requires_grad_(False)
    tokenizer, text_encoder, _ = folder_text(root)
    text_encoder.eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True).eval().requires_grad_(False)
    scheduler = training_scheduler_of(root / "scheduler")
    return Models(vae, tokenizer, text_encoder, False, unet, scheduler, str(root / "vae"), str(root / "text_encoder"),
                  str(root), cache_text=True)  # fmt: skip


def consistency_of(teacher: Models, grid: int) -> FlowConsistency | DDPMConsistency:
    """The consistency math on the teacher's own path: flow (with its shift) or DDPM (its schedule and prediction type)."""
    config = teacher.noise_scheduler.config
    return FlowConsistency(flow_shift(config), grid) if is_flow(config) else DDPMConsistency(config, grid)


def build_student(teacher: Models, d: DistillConfig) -> UNet2DConditionModel:
    """lcm: a copy of the teacher's U-Net with a guidance embedding added to its timestep embedding, initialised to
    zero (the student starts as the teacher at every scale); lcm-lora: the teacher's U-Net with adapters, which are
    all that trains (the teacher itself stays a separate frozen copy)."""
    if d.method == "lcm":
        student = UNet2DConditionModel.from_config({**teacher.unet.config, "time_cond_proj_dim": GUIDANCE_EMBEDDING_DIM})
        missing, unexpected = student.load_state_dict(teacher.unet.state_dict(), strict=False)
        assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.train().requires_grad_(True)
    student = UNet2DConditionModel.from_config(teacher.unet.config)
    student.load_state_dict(teacher.unet.state_dict())
    lora = FinetuneConfig(
        method="lora", lora_rank=d.lora_rank, lora_alpha=d.lora_alpha, lora_target_modules=d.lora_target_modules
    )
    add_lora(student, None, lora, text_trains=False)
    return student.train()


def export_student(d: DistillConfig, teacher: Models, student, scheduler, out: Path) -> Path:
    """``out/pipeline``: the teacher's autoencoder and text encoder with the student U-Net (lcm-lora: the adapters
    fused into the teacher's, and the adapters alone in ``out/lora``, diffusers' format), ``scheduler/`` LCM's, and
    ``sampling.json``: the student's steps and guidance (a LoRA student has its guidance built in: 1, no CFG pass)."""
    if d.method == "lcm-lora":
        export_lora(student, None, out / "lora", convert=False)  # adapters on convolutions too (LCM-LoRA's)
        pipe = fused_lora_pipeline(teacher.source, out / "lora")
    else:
        pipe = pipeline_of(teacher.vae, teacher.text_encoder, teacher.tokenizer, student, scheduler)
    pipe.scheduler = scheduler
    pipe.save_pretrained(out / "pipeline")
    write_sampling(out / "pipeline", d.steps, student_guidance(d), "lcm")
    return out / "pipeline"


def student_guidance(d: DistillConfig) -> float:
    """The guidance a student samples at: a full one's default scale; a LoRA one has its scale built in, so 1 (no
    unconditional pass: classifier-free guidance on top would apply it twice)."""
    return d.guidance if d.method == "lcm" else 1.0
