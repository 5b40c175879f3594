"""Stage 2: train a text-conditional U-Net to denoise the latents of a frozen stage-1 autoencoder.

    accelerate launch -m training.train_ldm --config configs/ldm/openmoji-32.yaml [key=value ...]

The dataset is encoded once into a latent cache (posterior moments, and the caption states of a
frozen text encoder); training steps never run the autoencoder. Running the same command again
on the same ``output_dir`` resumes exactly. At the end: ``output_dir/pipeline/`` (diffusers
layout; the U-Net is the EMA one) and ``output_dir/metrics.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from autoencoder import load_autoencoder, normalize_latents
from ldm.diffusion import PREDICTION_TYPES, add_noise, min_snr_weights, offset_noise, sample_latents, training_scheduler, v_target
from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import SCHEDULERS, make_scheduler
from ldm.text import CLIP_TEXT_PRESETS, build_clip_text_encoder, clip_tokenizer, encode_text, load_minilm, tokenize, uses_attention_mask
from ldm.unet import UNET_PRESETS, build_unet, unet_downsampling
from training.checkpoint import resume_from_latest, save_checkpoint
from training.config import ConfigError, MixedPrecision, parse_cli, save_config, to_dict
from training.data import DataConfig, ResumableBatchSampler, load_records
from training.latent_cache import build_latent_cache, cache_key, file_digest, folder_digest, load_latent_cache
from training.utils import JsonlLog, run_job, save_grid, set_cpu_threads, training_attention, write_json_atomic

DEFAULT_PROMPTS = ("red apple", "grinning face", "sun", "red heart", "pine tree", "dog face", "rocket", "snowflake")


@dataclass(frozen=True)
class LdmModelConfig:
    vae: str = "runs/autoencoder-openmoji-32-f4/vae"  # a stage-1 vae/ folder (frozen)
    text_encoder: str = "minilm"  # minilm (pretrained, frozen) | clip-scratch (trained jointly) | a transformers folder (frozen)
    clip_preset: str = "small"  # clip-scratch size: a key of ldm.text.CLIP_TEXT_PRESETS
    unet: str = "small"  # a key of ldm.unet.UNET_PRESETS
    prediction_type: str = "epsilon"  # epsilon | v_prediction (with init_from: read from its scheduler)
    init_from: str | None = None  # a pipeline folder (ours or Stable Diffusion layout) to fine-tune; then
    # vae / text_encoder / unet / prediction_type come from it, as they are
    replace_vae: str | None = None  # with init_from: this vae/ folder instead of the pipeline's (e.g. the pipeline's
    # autoencoder fine-tuned on your images); the U-Net then adapts to it, and the exported pipeline carries it
    check_images: int = 64  # the autoencoder is first measured on this many of your images, beside bicubic resizing (0: skip)


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "full"  # full | lora
    train_text_encoder: bool = False  # full: train it too; lora: also put adapters on it
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # U-Net attention
    text_lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass(frozen=True)
class ObjectiveConfig:
    min_snr_gamma: float | None = 5.0  # None: plain MSE
    offset_noise: float = 0.0  # e.g. 0.05; 0: off
    zero_terminal_snr: bool = False  # needs prediction_type=v_prediction
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)


@dataclass(frozen=True)
class LdmTrainConfig:
    batch_size: int = 64  # per process, per micro-batch
    grad_accum_steps: int = 1
    max_steps: int = 4000
    lr: float = 3e-4
    text_lr: float | None = None  # clip-scratch only; None: the same as lr
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization schedule name
    lr_warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = MixedPrecision.auto  # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float | None = 0.999  # None: no EMA (the exported U-Net is then the trained one)
    cpu_threads: int | None = None  # None: the machine's cores / processes on it
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_every: int = 500


@dataclass(frozen=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    images_per_prompt: int = 4
    steps: int = 25
    guidance: float = 3.0
    scheduler: str = "dpm++"
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    dir: str | None = None  # None: output_dir/latent-cache
    batch_size: int = 64


@dataclass(frozen=True)
class LdmEvalConfig:
    num_prompts: int = 100  # prompt adherence / FD-VGG at the end on this many training captions (0: skip)
    steps: int = 25
    guidance: float = 3.0


@dataclass(frozen=True)
class LdmJobConfig:
    output_dir: str = "runs/ldm"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: LdmModelConfig = field(default_factory=LdmModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: LdmTrainConfig = field(default_factory=LdmTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: LdmEvalConfig = field(default_factory=LdmEvalConfig)


class Denoiser(torch.nn.Module):
    """The trained part as one ``forward`` (so DDP synchronises all of it): the U-Net, and the text
    encoder when it trains jointly (then the step passes token ids instead of cached states)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: torch.nn.Module | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t, t, states=None, mask=None, input_ids=None):
        if input_ids is not None:  # (B, L, D); masked only for bidirectional encoders (CLIP: as at generation)
            states = self.text_encoder(input_ids, attention_mask=mask)[0] if mask is not None else self.text_encoder(input_ids)[0]
        return self.unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample


def load_text_encoder(cfg: LdmModelConfig):
    """(tokenizer, text_encoder, trains): minilm / clip-scratch / a local transformers folder."""
    if cfg.text_encoder == "minilm":
        tokenizer, encoder = load_minilm()
        return tokenizer, encoder, False
    if cfg.text_encoder == "clip-scratch":
        return clip_tokenizer(), build_clip_text_encoder(cfg.clip_preset), True
    path = Path(cfg.text_encoder)
    if not path.is_dir():
        raise ValueError(f"model.text_encoder='{cfg.text_encoder}' is neither minilm, clip-scratch nor an existing folder")
    model_dir, tok_dir = (path / "text_encoder", path / "tokenizer") if (path / "text_encoder").is_dir() else (path, path)
    return AutoTokenizer.from_pretrained(tok_dir), AutoModel.from_pretrained(model_dir, use_safetensors=True), False


def validate(cfg: LdmJobConfig) -> None:
    """Cheap checks of the config alone (the models' compatibility is checked once they are built)."""
    t, o, m = cfg.train, cfg.objective, cfg.model
    for key, value in (("train.batch_size", t.batch_size), ("train.max_steps", t.max_steps), ("train.grad_accum_steps", t.grad_accum_steps),
                       ("train.checkpoint_every", t.checkpoint_every), ("train.log_every", t.log_every),
                       ("train.sample_every", t.sample_every), ("data.resolution", cfg.data.resolution),
                       ("sample.steps", cfg.sample.steps), ("sample.images_per_prompt", cfg.sample.images_per_prompt)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if m.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"model.prediction_type='{m.prediction_type}' is unknown; valid: {', '.join(PREDICTION_TYPES)}")
    if m.unet not in UNET_PRESETS:
        raise ConfigError(f"model.unet='{m.unet}' is unknown; valid: {', '.join(UNET_PRESETS)}")
    if m.text_encoder == "clip-scratch" and m.clip_preset not in CLIP_TEXT_PRESETS:
        raise ConfigError(f"model.clip_preset='{m.clip_preset}' is unknown; valid: {', '.join(CLIP_TEXT_PRESETS)}")
    if o.zero_terminal_snr and m.prediction_type != "v_prediction":
        raise ConfigError("objective.zero_terminal_snr=true needs model.prediction_type=v_prediction: at SNR 0 the noise "
                         "is the input, so there is nothing to learn for an epsilon target")  # fmt: skip
    if not 0.0 <= o.caption_dropout < 1.0:
        raise ConfigError(f"objective.caption_dropout={o.caption_dropout} must be in [0, 1)")
    if o.min_snr_gamma is not None and o.min_snr_gamma <= 0:
        raise ConfigError(f"objective.min_snr_gamma={o.min_snr_gamma} must be > 0 (or null for plain MSE)")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in (0, 1) (or null for no EMA)")
    if cfg.finetune.method not in ("full", "lora"):
        raise ConfigError(f"finetune.method='{cfg.finetune.method}' is unknown; valid: full, lora")
    if cfg.finetune.method == "lora" and not m.init_from:
        raise ConfigError("finetune.method=lora needs model.init_from=PIPELINE_DIR: adapters go on a trained model")
    if cfg.finetune.lora_rank < 1:
        raise ConfigError(f"finetune.lora_rank={cfg.finetune.lora_rank} must be >= 1")
    if m.init_from:
        from ldm.pipeline import check_pipeline_folder

        check_pipeline_folder(m.init_from)
    elif m.replace_vae:
        raise ConfigError("model.replace_vae is for fine-tuning a pipeline (model.init_from=PIPELINE_DIR); "
                         "for a new U-Net, set model.vae")  # fmt: skip
    if cfg.sample.scheduler not in SCHEDULERS:
        raise ConfigError(f"sample.scheduler='{cfg.sample.scheduler}' is unknown; valid: {', '.join(SCHEDULERS)}")
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    names = [s.value for s in TYPE_TO_SCHEDULER_FUNCTION]
    if t.lr_schedule not in names:
        raise ConfigError(f"train.lr_schedule='{t.lr_schedule}' is unknown; valid: {', '.join(names)}")


def check_compatible(unet, vae, text_encoder, resolution: int, vae_path: str) -> None:
    """The errors that would otherwise surface as a shape mismatch deep inside the first step."""
    latent_channels = vae.config.latent_channels
    if unet.config.in_channels != latent_channels:
        raise ConfigError(f"the U-Net takes {unet.config.in_channels} input channels but the autoencoder {vae_path} "
                         f"makes {latent_channels}-channel latents")  # fmt: skip
    hidden = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != hidden:
        raise ConfigError(f"the U-Net's cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder's "
                         f"hidden size is {hidden}")  # fmt: skip
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    total = f * unet_downsampling(unet)
    if resolution % total:
        raise ConfigError(f"data.resolution={resolution} is not divisible by {total} (autoencoder x{f} times U-Net "
                         f"x{total // f}); valid: multiples of {total}, e.g. {max(total, resolution // total * total)}")  # fmt: skip



def check_autoencoder_fit(vae, records, cfg: LdmJobConfig, vae_dir: str) -> dict:
    """Reconstruct ``model.check_images`` of the training images through the frozen autoencoder and
    through plain bicubic resizing to as many numbers as its latent holds. A U-Net can only learn
    what the autoencoder can represent: if it is worse than resizing, warn with both figures and
    the command that fine-tunes the autoencoder on these images. Returns the figures (for log.jsonl)."""
    from dataclasses import replace

    from autoencoder.metrics import autoencoder_code, compare_codes
    from training.evaluate import latent_values, load_images, reference_codes

    images = load_images(records, replace(cfg.data, random_flip=False), cfg.model.check_images)
    n = latent_values(vae, cfg.data.resolution)
    bicubic_name, bicubic = next(iter(reference_codes(n, None).items()))
    with torch.no_grad():
        figures = compare_codes({"vae": autoencoder_code(vae), bicubic_name: bicubic}, images.split(64), lpips=None)
    ours, ref = figures["vae"], figures[bicubic_name]
    fit = {"images": ours["num_images"], "latent_values": n, "vae_psnr": round(ours["psnr"], 2),
           "vae_colour_error": round(ours["colour_error"], 2), "reference": bicubic_name,
           "reference_psnr": round(ref["psnr"], 2), "reference_colour_error": round(ref["colour_error"], 2)}  # fmt: skip
    fit["worse_than_reference"] = ours["psnr"] < ref["psnr"]
    print(f"autoencoder check on {fit['images']} of your images: {vae_dir} PSNR {fit['vae_psnr']} dB, colour error "
          f"{fit['vae_colour_error']} (0-255 levels); bicubic to the latent's {n} values: {fit['reference_psnr']} dB, "
          f"colour error {fit['reference_colour_error']}")  # fmt: skip
    if fit["worse_than_reference"]:
        name = Path(cfg.output_dir).name
        swap = f"model.replace_vae=runs/{name}-autoencoder/vae" if cfg.model.init_from else f"model.vae=runs/{name}-autoencoder/vae"
        print(f"warning: the autoencoder {vae_dir} reconstructs your images worse than plain resizing to its latent size "
              f"({fit['vae_psnr']} vs {fit['reference_psnr']} dB): it cannot represent them, and no U-Net training fixes that. "
              f"Fine-tune the autoencoder (encoder and decoder) on these images first:\n"
              f"  accelerate launch -m training.train_autoencoder --config configs/autoencoder/finetune.yaml "
              f"model.init_from={vae_dir} data.path={cfg.data.path} data.resolution={cfg.data.resolution} "
              f"output_dir=runs/{name}-autoencoder\n"
              f"then run this job again with {swap}")  # fmt: skip
    return fit

def step_randomness(seed: int, micro_batch: int, global_batch: int, latent_shape: tuple, rank: int, world: int) -> dict:
    """Every random draw of one micro-batch, made for the whole global batch from (seed, micro-batch)
    and sliced like the data ([rank::world]): a sample gets the same noise whatever the number of
    processes, and a resumed run the same as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * micro_batch + 1)
    draws = {
        "latent_noise": torch.randn(global_batch, *latent_shape, generator=g),  # posterior sample
        "eps": torch.randn(global_batch, *latent_shape, generator=g),  # diffusion noise
        "offset": torch.randn(global_batch, latent_shape[0], generator=g),
        "t": torch.randint(0, 1000, (global_batch,), generator=g),
        "drop": torch.rand(global_batch, generator=g),
    }
    return {k: v[rank::world] for k, v in draws.items()}


def train(cfg: LdmJobConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train (or resume) the latent U-Net; returns the exported ``pipeline/`` folder.
    ``stop_after_steps`` stops right after that step's checkpoint, as if killed there (tests)."""
    validate(cfg)
    out = Path(cfg.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision.accelerate_name(device),
                              gradient_accumulation_steps=cfg.train.grad_accum_steps, cpu=device == "cpu")  # fmt: skip
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    threads = torch.get_num_threads()
    if device == "cpu":
        threads = set_cpu_threads(cfg.train.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    set_seed(cfg.seed)  # the same initial weights on every process

    # 1. Data and models, checked against each other before anything expensive.
    records = load_records(cfg.data.path, cfg.data, captions=True)
    models = load_models(cfg)
    vae, tokenizer, text_encoder, unet = models.vae.to(accelerator.device), models.tokenizer, models.text_encoder, models.unet
    check_compatible(unet, vae, text_encoder, cfg.data.resolution, models.vae_dir)
    fit = None
    if is_main and cfg.model.check_images:  # can the frozen autoencoder represent these images at all?
        fit = check_autoencoder_fit(vae, records, cfg, models.vae_dir)
    noise_scheduler = models.noise_scheduler
    abar = noise_scheduler.alphas_cumprod  # (1000,)
    text_trains = models.text_trains
    text_encoder.to(accelerator.device).train(text_trains)
    lora = cfg.finetune.method == "lora"
    if lora:  # peft adapters on the attention projections; the base weights stay frozen
        ft = cfg.finetune
        adapters = lambda targets: LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian",  # noqa: E731
                                              target_modules=list(targets))  # fmt: skip
        unet.requires_grad_(False)
        unet.add_adapter(adapters(ft.lora_target_modules))
        if text_trains:
            text_encoder.requires_grad_(False)
            add_text_lora(text_encoder, adapters(ft.text_lora_target_modules))
    else:
        text_encoder.requires_grad_(text_trains)
    masked = uses_attention_mask(text_encoder)

    # 2. The latent cache: encoded once (main process first; the others then find it complete).
    cache_root = Path(cfg.cache.dir or out / "latent-cache")
    with accelerator.main_process_first():
        text_digest = None if text_trains else folder_digest(models.text_encoder_dir)
        key = cache_key(file_digest(Path(models.vae_dir) / "diffusion_pytorch_model.safetensors"), cfg.data, records, text_digest)
        folder = build_latent_cache(cache_root, key, vae, records, cfg.data, None if text_trains else (tokenizer, text_encoder),
                                    cfg.cache.batch_size, show_progress=is_main)  # fmt: skip
    cache = load_latent_cache(folder, records)
    if not text_trains:
        empty = encode_text(tokenizer, text_encoder, [""], pad_to=cache.text_states.shape[1])  # dropped captions
        empty_states, empty_mask = empty.states.float().cpu(), (empty.mask if masked else torch.ones(1, cache.text_states.shape[1])).cpu()

    # 3. Optimiser, LR schedule, EMA; resume.
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = [p for p in unet.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    groups = [{"params": unet_params, "lr": cfg.train.lr}]
    if text_trains:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": cfg.train.text_lr or cfg.train.lr})
    # fused AdamW and foreach EMA: one kernel over all parameters instead of one per tensor
    # (train step 0.42 -> 0.39 s in benchmarks/training_throughput.py's setting).
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay, fused=True)
    lr_sched = get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
                             num_training_steps=cfg.train.max_steps)  # stepped once per optimizer step  # fmt: skip
    ema = EMAModel(unet_params, decay=cfg.train.ema_decay, foreach=True) if cfg.train.ema_decay else None
    model, optimizer = accelerator.prepare(Denoiser(unet, text_encoder if text_trains else None), optimizer)
    accelerator.register_for_checkpointing(lr_sched)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    raw = accelerator.unwrap_model(model)
    layout = {"batch_size": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps, "num_processes": world, "seed": cfg.seed}
    state = resume_from_latest(accelerator, out, layout) or {"step": 0, "micro_batches": 0}
    step, micro = state["step"], state["micro_batches"]
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    sampler = ResumableBatchSampler(len(cache), cfg.train.batch_size, cfg.seed, start=micro, rank=rank, world_size=world,
                                    random_flip=cfg.data.random_flip, repeat_small=True)  # fmt: skip
    if is_main and sampler.repeats > 1:
        print(f"{len(cache)} images, fewer than one global batch of {cfg.train.batch_size * world}: sampling with replacement")
    if is_main and cache.upscaled:
        print(f"warning: {cache.upscaled} images are smaller than data.resolution={cfg.data.resolution} and were upscaled")
    log = JsonlLog(out / "log.jsonl", enabled=is_main)
    log.write(step=step, event="resume" if step else "start", device=str(accelerator.device), processes=world, cpu_threads=threads,
              mixed_precision=accelerator.mixed_precision, cached_images=len(cache), upscaled_images=cache.upscaled, with_replacement=sampler.repeats > 1,
              unet_parameters=sum(p.numel() for p in unet.parameters()), trained_parameters=sum(p.numel() for p in unet_params))  # fmt: skip
    if fit is not None:
        log.write(step=step, event="autoencoder_check", **fit)
    batches = iter(sampler)
    latent_shape = tuple(cache.moments.shape[1:])
    latent_shape = (latent_shape[0] // 2, *latent_shape[1:])  # (C, h, w)
    global_batch = cfg.train.batch_size * world

    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="latent diffusion", disable=not is_main, dynamic_ncols=True)
    window_start, window_loss, window_n, started = time.perf_counter(), 0.0, 0, time.perf_counter()
    while step < cfg.train.max_steps:
        # 4. One optimizer step = grad_accum_steps micro-batches.
        for _ in range(cfg.train.grad_accum_steps):
            picks = next(batches)
            rnd = step_randomness(cfg.seed, micro, global_batch, latent_shape, rank, world)
            micro += 1
            idx = torch.tensor([i for i, _ in picks])
            flip = torch.tensor([f for _, f in picks])
            moments = cache.moments[idx]
            if cache.moments_flipped is not None:
                moments = torch.where(flip[:, None, None, None], cache.moments_flipped[idx], moments)
            # x_0: a fresh draw from the cached posterior, normalised to unit variance by the
            # autoencoder's own scaling/shift factor.
            x0 = normalize_latents(vae, sample_latents(moments, rnd["latent_noise"])).to(accelerator.device)  # (B, C, h, w)
            eps = rnd["eps"].to(accelerator.device)
            if cfg.objective.offset_noise:
                eps = offset_noise(eps, cfg.objective.offset_noise, rnd["offset"])
            t = rnd["t"].to(accelerator.device)
            x_t = add_noise(x0, eps, t, abar)  # sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
            target = eps if cfg.model.prediction_type == "epsilon" else v_target(x0, eps, t, abar)
            drop = rnd["drop"] < cfg.objective.caption_dropout  # these captions become "" (for guidance)
            if text_trains:
                captions = ["" if d else cache.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
                tokens = tokenize(tokenizer, text_encoder, captions)
                cond = {"input_ids": tokens["input_ids"].to(accelerator.device),
                        "mask": tokens["attention_mask"].to(accelerator.device) if masked else None}  # fmt: skip
            else:
                states = torch.where(drop[:, None, None], empty_states, cache.text_states[idx])
                mask = torch.where(drop[:, None], empty_mask, cache.text_mask[idx])
                cond = {"states": states.to(accelerator.device), "mask": mask.to(accelerator.device) if masked else None}
            with accelerator.accumulate(model), accelerator.autocast():
                with training_attention(accelerator.device):
                    pred = model(x_t, t, **cond)
                per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
                if cfg.objective.min_snr_gamma:
                    per_sample = per_sample * min_snr_weights(t, abar, cfg.objective.min_snr_gamma, cfg.model.prediction_type)
                loss = per_sample.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += loss.detach().item()
            window_n += 1
        lr_sched.step()
        if ema is not None:
            ema.step(unet_params)
        step += 1
        bar.update(1)

        # 5. Logs, sample grids, checkpoints.
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            mean_loss = accelerator.reduce(torch.tensor(window_loss / window_n, device=accelerator.device), "mean").item()
            elapsed = time.perf_counter() - window_start
            log.write(step=step, loss=round(mean_loss, 6), lr=lr_sched.get_last_lr()[0],
                      images_per_s=round(window_n * global_batch / elapsed, 2))  # fmt: skip
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
        if is_main and (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps):
            with _ema_weights(ema, unet_params):
                save_samples(_pipeline(vae, text_encoder, tokenizer, raw.unet, noise_scheduler), cfg.sample,
                             out / "samples" / f"step-{step:08d}.png")  # fmt: skip
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            save_checkpoint(accelerator, out, step, {"micro_batches": micro, **layout}, cfg.train.keep_checkpoints)
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            return out / "pipeline"
    bar.close()

    # 6. Export: the pipeline (EMA weights, DPM++ on the training schedule); for LoRA also the
    #    adapters alone in diffusers' format, and the pipeline with them fused.
    if is_main:
        if ema is not None:
            ema.copy_to(unet_params)
        if lora:
            export_lora(raw.unet, text_encoder if text_trains else None, out / "lora")
            pipe = LatentDiffusionPipeline.from_pretrained(models.source, dtype="fp32")
            if cfg.model.replace_vae:
                pipe.vae = vae
            pipe.load_lora_weights(str(out / "lora"))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            pipe.scheduler = make_scheduler("dpm++", noise_scheduler.config)
        else:
            pipe = _pipeline(vae, text_encoder, tokenizer, raw.unet, make_scheduler("dpm++", noise_scheduler.config))
        pipe.save_pretrained(out / "pipeline")
        metrics = {"steps": step, "train_seconds_this_run": round(time.perf_counter() - started, 1), "cached_images": len(cache),
                   "final_loss": _last_logged(out / "log.jsonl", "loss")}  # fmt: skip
        if cfg.eval.num_prompts:
            from training.evaluate import evaluate_pipeline

            metrics["eval"] = evaluate_pipeline(out / "pipeline", cfg.data.path, cfg.eval.num_prompts, cfg.eval.steps, cfg.eval.guidance,
                                                seed=cfg.seed, data_cfg=cfg.data)  # fmt: skip
        metrics["config"] = to_dict(cfg)
        write_json_atomic(out / "metrics.json", metrics)
        print(f"saved {out / 'pipeline'}; metrics in {out / 'metrics.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "pipeline"


@dataclass
class Models:
    vae: Any
    tokenizer: Any
    text_encoder: Any
    text_trains: bool
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    vae_dir: str
    text_encoder_dir: str | None  # what the text cache is keyed on (None: the encoder trains)
    source: str | None  # the init_from pipeline folder


def load_models(cfg: LdmJobConfig) -> Models:
    """Fresh U-Net on a stage-1 autoencoder, or every component of an existing pipeline folder
    (``model.init_from``) as it is: its scheduler config gives the schedule and prediction type,
    its vae config the scaling factor."""
    m, ft = cfg.model, cfg.finetune
    if m.init_from:
        root = Path(m.init_from)
        vae_dir = Path(m.replace_vae) if m.replace_vae else root / "vae"
        vae = load_autoencoder(vae_dir)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = AutoModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"))
        trains = ft.train_text_encoder
        return Models(vae.eval().requires_grad_(False), tokenizer, text_encoder, trains, unet, noise_scheduler, str(vae_dir),
                      None if trains else str(root / "text_encoder"), str(root))  # fmt: skip
    vae = load_autoencoder(m.vae).eval().requires_grad_(False)
    tokenizer, text_encoder, trains = load_text_encoder(m)
    latent_size = cfg.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(m.unet, latent_size, text_encoder.config.hidden_size, vae.config.latent_channels)
    noise_scheduler = training_scheduler(m.prediction_type, cfg.objective.zero_terminal_snr)
    if m.text_encoder == "minilm":
        from ldm.text import minilm_path

        encoder_dir = str(minilm_path())
    else:
        encoder_dir = m.text_encoder
    return Models(vae, tokenizer, text_encoder, trains, unet, noise_scheduler, m.vae, None if trains else encoder_dir, None)


def add_text_lora(text_encoder, config: LoraConfig) -> None:
    """LoRA adapters on a transformers text encoder, with peft itself: transformers 5's
    ``add_adapter`` wants a peft release newer than the registries may have (0.22). Recorded in
    ``peft_config`` as ``add_adapter`` does, so peft's state-dict helpers find the adapter."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}


def export_lora(unet, text_encoder, folder: Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in the format diffusers' ``load_lora_weights`` reads."""
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if text_encoder is not None else None
    LatentDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                                              safe_serialization=True)  # fmt: skip
    return folder / "pytorch_lora_weights.safetensors"


class _ema_weights:
    """Temporarily swap the EMA weights into the U-Net (for samples)."""

    def __init__(self, ema: EMAModel | None, params: list) -> None:
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def _pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def save_samples(pipe: LatentDiffusionPipeline, cfg: SampleConfig, path: Path) -> Path:
    """A grid with a row per validation prompt, the same seeds every time."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config)
    n = cfg.images_per_prompt
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(cfg.prompts) * n)]
    images = pipe(list(cfg.prompts), num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, num_images_per_prompt=n,
                  generator=generators, output_type="pt").images  # (P*n, 3, H, W) in [0, 1]  # fmt: skip
    pipe.unet.train(was_training)
    rows = [images[i * n:(i + 1) * n] * 2 - 1 for i in range(len(cfg.prompts))]
    return save_grid(rows, path, scale=2)


def _last_logged(path: Path, key: str):
    import json

    value = None
    for line in path.read_text().splitlines():
        value = json.loads(line).get(key, value)
    return value


def main(argv: list[str] | None = None) -> None:
    run_job(train, parse_cli(LdmJobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
