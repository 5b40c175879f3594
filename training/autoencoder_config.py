"""The stage-1 job's config schema (``training.train_autoencoder``) and its rules: each section
checks its own fields when it is built (``__post_init__``), the job config the rules across them,
so a bad key or value stops ``load_config`` with one line naming it."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoencoder.losses import LossConfig
from training.config import ConfigError, MixedPrecision
from training.data.records import DataConfig
from training.run.setup import RunConfig, refuse_stage2_only


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "f4-small"  # a key of autoencoder.AUTOENCODER_PRESETS
    init_from: str | None = None  # a saved vae/ folder to start from instead of a fresh preset
    latent_channels: int | None = None  # None: the preset's (4)
    norm_num_groups: int | None = None  # None: the preset's (GroupNorm groups in every block)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    disc_lr: float | None = None  # constant discriminator LR; None: the same as lr
    adam_beta1: float = 0.5  # the reference recipe's betas for both optimizers
    adam_beta2: float = 0.9
    channels_last: bool = True  # NHWC convolutions: ~10% faster on these CPUs
    scale_fit_batches: int = 40  # batches used to fit the latent scaling factor
    fit_shift: bool = False  # also fit a shift_factor (not read by diffusers' SD pipelines)
    decoder_only: bool = False  # with model.init_from: train only the decoder; the encoder, the latent space and
    # its scaling factor stay exactly as they were, so latent models trained on them stay valid

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_fit_batches < 1:
            raise ConfigError(f"train.scale_fit_batches={self.scale_fit_batches} must be >= 1")
        refuse_stage2_only(self)
        if self.mixed_precision is MixedPrecision.fp16:
            raise ConfigError(
                "train.mixed_precision=fp16 is not supported by the autoencoder job: the adaptive GAN weight "
                "takes unscaled gradients that underflow in fp16. Use bf16, fp32 or auto"
            )


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 64
    max_images: int | None = None  # cap the held-out images used for metrics.json (per set)
    ood: list[str] = field(default_factory=list)  # out-of-domain imagefolders also measured in metrics.json (under ood.<name>)
    pca_fit_images: int = 4096  # training images (spread over the split) the PCA reference is fitted on


@dataclass(frozen=True)
class AutoencoderJobConfig:
    output_dir: str = "runs/autoencoder"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    # more imagefolders whose train split is trained on beside data.path's (e.g. data/generic-32:
    # photo crops and drawn shapes, so the latent space holds any colour and shape, not only data.path's)
    extra_data: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: AutoencoderJobConfig) -> None:
    """The rules across sections (each section checks its own fields when it is built); no file
    is read: the folders the config names are checked by the job."""
    if cfg.data.mask:
        raise ConfigError(
            f"data.mask={cfg.data.mask} weights the latent model's loss (training.train_ldm); the autoencoder has none"
        )
    if cfg.train.decoder_only and not cfg.model.init_from:
        raise ConfigError(
            "train.decoder_only=true needs model.init_from=VAE_DIR: it fine-tunes the decoder of a trained autoencoder"
        )
