"""The stage-2 job's config schema (``training.train_ldm``) and its rules.

Every key is a field here. Each section checks its own fields when it is built (``__post_init__``) and the job
config the rules across them, so a bad value stops ``load_config`` with one line. A key that would be ignored in the
combination given is an error naming the conflict (a ``model.unet`` preset next to ``model.init_from``, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ldm.diffusion import PREDICTION_TYPES
from ldm.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS
from ldm.schedulers import SCHEDULERS
from ldm.text import CLIP_TEXT_PRESETS
from ldm.unet import UNET_PRESETS
from training.config import ConfigError
from training.data.captions import CaptionConfig
from training.data.records import DataConfig
from training.run.setup import RunConfig

DEFAULT_PROMPTS = ("red apple", "grinning face", "sun", "red heart", "pine tree", "dog face", "rocket", "snowflake")
FINETUNE_METHODS = ("none", "full", "lora")
OBJECTIVE_TYPES = ("ddpm", "flow")


@dataclass(frozen=True)
class LdmModelConfig:
    vae: str = "runs/autoencoder-openmoji-32-f4/vae"  # a stage-1 vae/ folder (frozen)
    text_encoder: str = "minilm"  # minilm (pretrained, frozen) | clip-scratch (trained jointly) | a transformers folder (frozen)
    clip_preset: str = "small"  # clip-scratch size: a key of ldm.text.CLIP_TEXT_PRESETS
    unet: str = "small"  # a key of ldm.unet.UNET_PRESETS
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    init_from: str | None = None  # a pipeline folder (ours, SD or SDXL layout) to fine-tune (finetune.method full
    # or lora); its vae / text_encoder / unet / scheduler are used as they are, so the keys above must stay unset
    replace_vae: str | None = None  # with init_from: this vae/ folder instead of the pipeline's (e.g. the pipeline's
    # autoencoder fine-tuned on your images); the U-Net then adapts to it, and the exported pipeline carries it
    check_images: int = 64  # the autoencoder is first measured on this many of your images, beside bicubic resizing (0: skip)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"model.prediction_type='{self.prediction_type}' is unknown; valid: {', '.join(PREDICTION_TYPES)}")
        if self.unet not in UNET_PRESETS:
            raise ConfigError(f"model.unet='{self.unet}' is unknown; valid: {', '.join(UNET_PRESETS)}")
        if self.text_encoder == "clip-scratch" and self.clip_preset not in CLIP_TEXT_PRESETS:
            raise ConfigError(f"model.clip_preset='{self.clip_preset}' is unknown; valid: {', '.join(CLIP_TEXT_PRESETS)}")


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "none"  # none (a new U-Net) | full (every weight of model.init_from's U-Net) | lora (adapters on it)
    train_text_encoder: bool = False  # full: train it too; lora: also put adapters on it
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # U-Net attention
    text_lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"finetune.method='{self.method}' is unknown; valid: {', '.join(FINETUNE_METHODS)}")
        if self.lora_rank < 1:
            raise ConfigError(f"finetune.lora_rank={self.lora_rank} must be >= 1")


@dataclass(frozen=True)
class ObjectiveConfig:
    # ddpm (eps or v) | flow (the U-Net predicts eps - x_0; ldm/flow.py). Unset: ddpm; a fine-tune's folder's (with_objective)
    type: str | None = None
    min_snr_gamma: float | None = 5.0  # ddpm; None: plain MSE
    offset_noise: float = 0.0  # e.g. 0.05; 0: off
    zero_terminal_snr: bool = False  # ddpm; needs prediction_type=v_prediction (a new U-Net only: init_from brings its schedule)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)
    timesteps: str = "logit_normal"  # flow: how sigma is drawn: uniform | logit_normal | mode (SD3)
    logit_mean: float = 0.0  # flow, logit_normal
    logit_std: float = 1.0  # flow, logit_normal
    mode_scale: float = 1.29  # flow, mode
    shift: float | None = None  # flow: SD3's shift of sigma (> 1: nearer the noise). Unset: 1.0; a fine-tune's folder's
    weighting: str = "none"  # flow: the loss weight of sigma: none | sigma_sqrt | cosmap

    DDPM_KEYS = ("min_snr_gamma", "zero_terminal_snr")
    FLOW_KEYS = ("timesteps", "logit_mean", "logit_std", "mode_scale", "shift", "weighting")

    def __post_init__(self) -> None:
        if self.type not in (None, *OBJECTIVE_TYPES):
            raise ConfigError(f"objective.type='{self.type}' is unknown; valid: ddpm, flow")
        if self.timesteps not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"objective.timesteps='{self.timesteps}' is unknown; valid: {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"objective.weighting='{self.weighting}' is unknown; valid: {', '.join(LOSS_WEIGHTINGS)}")
        if (self.shift is not None and self.shift <= 0) or self.logit_std <= 0:
            raise ConfigError(f"objective.shift={self.shift} and objective.logit_std={self.logit_std} must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"objective.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"objective.min_snr_gamma={self.min_snr_gamma} must be > 0 (or null for plain MSE)")


@dataclass(frozen=True)
class LdmTrainConfig(RunConfig):
    batch_size: int = 64  # per process, per micro-batch
    max_steps: int = 4000
    lr: float = 3e-4
    text_lr: float | None = None  # for a text encoder that trains (clip-scratch, or finetune.train_text_encoder); None: lr
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    ema_decay: float | None = 0.999  # None: no EMA (the exported U-Net is then the trained one)
    log_every: int = 50


@dataclass(frozen=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    images_per_prompt: int = 4
    steps: int = 25
    guidance: float = 3.0
    scheduler: str = "dpm++"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "images_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sample.{key}={getattr(self, key)} must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sample.scheduler='{self.scheduler}' is unknown; valid: {', '.join(SCHEDULERS)}")


@dataclass(frozen=True)
class CacheConfig:
    dir: str | None = None  # None: output_dir/latent-cache
    batch_size: int = 64
    shard_size: int = 2048  # images per shard file; the processes of a run encode the shards between them
    text: bool = True  # a frozen text encoder's caption states in the cache (bf16); false: encoded every step

    def __post_init__(self) -> None:
        for key in ("batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cache.{key}={getattr(self, key)} must be >= 1")


@dataclass(frozen=True)
class LdmEvalConfig:
    num_prompts: int = 100  # prompt adherence / FD-VGG at the end on this many training captions (0: skip)
    steps: int = 25
    guidance: float = 3.0
    every: int = 0  # validation loss on data.eval_split every this many steps and at the end (0: off)
    val_images: int = 64  # held-out images it scores (spread over the split)
    keep_best: bool = False  # keep the weights of the lowest validation loss and export them to output_dir/best/

    def __post_init__(self) -> None:
        if self.every < 0 or self.val_images < 1:
            raise ConfigError(f"eval.every={self.every} must be >= 0 and eval.val_images={self.val_images} >= 1")
        if self.keep_best and not self.every:
            raise ConfigError(
                "eval.keep_best=true needs eval.every > 0: the best weights are those of the lowest validation loss"
            )


@dataclass(frozen=True)
class PriorConfig:
    """DreamBooth's prior preservation (training/stage2/prior.py)."""

    class_data: str | None = None  # a folder of class images (None: no prior preservation)
    class_prompt: str = ""  # every class image's caption, and what the base model draws missing ones from
    num_class_images: int = 100  # the base model draws the missing ones into class_data
    loss_weight: float = 1.0  # of the class images' mean loss
    steps: int = 25  # the base model's sampling steps for a class image
    guidance: float = 5.0  # and its guidance scale

    def __post_init__(self) -> None:
        if self.class_data is None:
            return
        if not self.class_prompt.strip():
            raise ConfigError("prior.class_data needs prior.class_prompt (e.g. 'a photo of a dog'): the class images' caption")
        if self.num_class_images < 1 or self.loss_weight <= 0 or self.steps < 1:
            raise ConfigError(
                f"prior.num_class_images={self.num_class_images} and prior.steps={self.steps} must be >= 1, "
                f"prior.loss_weight={self.loss_weight} > 0"
            )


@dataclass(frozen=True)
class LdmJobConfig:
    output_dir: str = "runs/ldm"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)  # several per image, tag shuffling and dropout
    model: LdmModelConfig = field(default_factory=LdmModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: LdmTrainConfig = field(default_factory=LdmTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: LdmEvalConfig = field(default_factory=LdmEvalConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)  # DreamBooth's prior preservation (class images)

    def __post_init__(self) -> None:
        validate(self)


def text_encoder_trains(cfg: LdmJobConfig) -> bool:
    """clip-scratch trains with the U-Net; a pretrained encoder only with finetune.train_text_encoder."""
    return cfg.finetune.train_text_encoder if cfg.model.init_from else cfg.model.text_encoder == "clip-scratch"


def with_objective(cfg: LdmJobConfig, kind: str = "ddpm", shift: float | None = None, source: str | None = None) -> LdmJobConfig:
    """``cfg`` with objective.type and shift set: a new U-Net's unset ones ddpm and (flow) 1.0; a fine-tune keeps its
    folder's (``source``, trained with ``kind`` and ``shift``), and an explicit other one is refused."""
    o, keeps = cfg.objective, "which fine-tuning keeps; leave it unset"
    if source is not None and o.type not in (None, kind):
        raise ConfigError(f"objective.type={o.type}: model.init_from={source} was trained with objective.type={kind}, {keeps}")
    kind = o.type or kind
    if source is not None and kind == "flow" and o.shift not in (None, shift):
        raise ConfigError(f"objective.shift={o.shift}: model.init_from={source} was trained with shift {shift}, {keeps}")
    unset = (shift if source is not None else 1.0) if kind == "flow" else None
    shift = o.shift if o.shift is not None else unset  # a ddpm run's explicit shift is refused as flow's (validate)
    return replace(cfg, objective=replace(o, type=kind, shift=shift))


def _changed(section, keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` of a config section that differ from the schema's defaults."""
    default = type(section)()
    return [k for k in keys if getattr(section, k) != getattr(default, k)]


def validate(cfg: LdmJobConfig) -> None:
    """The rules across sections (each section checks its own fields when built); no file is read: the job checks
    the folders the config names, and the models' fit once they are built."""
    m, o = cfg.model, cfg.objective
    kind = o.type or (None if m.init_from else "ddpm")  # a fine-tune's unset type is its folder's (with_objective)
    other = {"ddpm": ObjectiveConfig.FLOW_KEYS, "flow": ObjectiveConfig.DDPM_KEYS}.get(kind, ())
    # "off" is no conflict: None, false, a shift of 1 (saved configs of before the shift could be unset hold it)
    if ignored := [k for k in _changed(o, other) if getattr(o, k) not in (None, False, 1.0 if k == "shift" else False)]:
        raise ConfigError(
            f"objective.{ignored[0]} would be ignored: it is for objective.type={'flow' if kind == 'ddpm' else 'ddpm'}, "
            f"and this run's is {kind}" + (f" (model.init_from={m.init_from}'s)" if m.init_from else "")
        )
    if kind == "flow" and m.prediction_type != "epsilon":
        raise ConfigError(
            f"model.prediction_type={m.prediction_type} is DDPM's; with objective.type=flow the U-Net predicts the velocity eps - x_0"
        )
    if o.zero_terminal_snr and m.prediction_type != "v_prediction":
        raise ConfigError(
            "objective.zero_terminal_snr=true needs model.prediction_type=v_prediction: at SNR 0 the noise "
            "is the input, so there is nothing to learn for an epsilon target"
        )
    if m.replace_vae and not m.init_from:
        raise ConfigError(
            "model.replace_vae is for fine-tuning a pipeline (model.init_from=PIPELINE_DIR); for a new U-Net, set model.vae"
        )
    _check_finetune_conflicts(cfg)
    if cfg.train.text_lr is not None and not text_encoder_trains(cfg):
        raise ConfigError(
            f"train.text_lr={cfg.train.text_lr} would be ignored: no text encoder trains here (it trains with "
            "model.text_encoder=clip-scratch, or finetune.train_text_encoder=true with model.init_from)"
        )
    if cfg.eval.every and not cfg.data.eval_split:
        raise ConfigError(f"eval.every={cfg.eval.every} scores held-out images: set data.eval_split (the split that holds them)")
    if cfg.prior.class_data and not m.init_from:
        raise ConfigError("prior.class_data preserves a trained model's class while it fine-tunes: it needs model.init_from")
    if cfg.prior.class_data and cfg.data.buckets.enabled:
        raise ConfigError("prior.class_data: class images are square crops at data.resolution; set data.buckets.enabled=false")
    if cfg.train.ema.kind == "posthoc" and text_encoder_trains(cfg):
        raise ConfigError(
            "train.ema.kind=posthoc tracks the U-Net's weights, and this run trains its text encoder too (clip-scratch or "
            "finetune.train_text_encoder): use train.ema.kind=decay"
        )


def _check_finetune_conflicts(cfg: LdmJobConfig) -> None:
    """finetune.method and model.init_from go together; keys the chosen path would ignore are errors."""
    m, ft = cfg.model, cfg.finetune
    if m.init_from and ft.method == "none":
        raise ConfigError(
            f"model.init_from={m.init_from} needs finetune.method=full (train every U-Net weight) or "
            "finetune.method=lora (adapters); finetune.method=none trains a new U-Net"
        )
    if not m.init_from and ft.method != "none":
        raise ConfigError(
            f"finetune.method={ft.method} needs model.init_from=PIPELINE_DIR: it fine-tunes a trained model "
            "(for a new U-Net: finetune.method=none)"
        )
    if m.init_from:
        ignored = _changed(m, ("vae", "text_encoder", "clip_preset", "unet", "prediction_type"))
        ignored += [f"objective.{k}" for k in _changed(cfg.objective, ("zero_terminal_snr",))]
        if ignored:
            keys = ", ".join(k if "." in k else f"model.{k}" for k in ignored)
            raise ConfigError(
                f"{keys} would be ignored: with model.init_from={m.init_from} the pipeline's own autoencoder, "
                "text encoder, U-Net and noise schedule are used as they are (to swap the autoencoder: model.replace_vae)"
            )
    else:
        ignored = [f"finetune.{k}" for k in _changed(ft, ("train_text_encoder",))]
        if ignored:
            raise ConfigError(
                f"{', '.join(ignored)} would be ignored: it applies when fine-tuning (model.init_from with "
                "finetune.method=full or lora); a new model trains model.text_encoder=clip-scratch and freezes the others"
            )
