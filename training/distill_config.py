"""The distillation job's config schema (``training.distill``): a trained pipeline (the teacher) distilled
into a few-step consistency student. The data, cache, sample and eval sections are stage 2's."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config import ConfigError
from training.data.records import DataConfig
from training.ldm_config import CacheConfig, LdmEvalConfig, SampleConfig
from training.run.setup import RunConfig, refuse_stage2_only

DISTILL_METHODS = ("lcm", "lcm-lora")
DISTANCES = ("huber", "l2")
# LCM-LoRA's adapters: every projection of the attention blocks and the ResNet convolutions, not only q/k/v/out
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # fmt: skip


@dataclass(frozen=True)
class DistillModelConfig:
    teacher: str = "runs/ldm-openmoji-32/pipeline"  # a pipeline folder this project exported, or a Stable-Diffusion one


@dataclass(frozen=True)
class DistillConfig:
    method: str = "lcm"  # lcm (a full student with a guidance embedding) | lcm-lora (adapters on the teacher, fixed guidance)
    grid: int = 50  # N: the teacher's ODE solver steps from noise to data; a student step learns one of them
    guidance_min: float = 2.0  # lcm: the teacher's guidance scales are drawn from [min, max], and the student embeds them
    guidance_max: float = 5.0
    guidance: float = 3.0  # lcm-lora: the fixed guidance the adapters learn; lcm: the exported default
    target_ema: float = 0.95  # lcm: the target network is this EMA of the student (LCM's); lcm-lora: the student itself
    distance: str = "huber"  # huber (pseudo-Huber, LCM's) | l2
    huber_c: float = 0.001
    steps: int = 4  # the student's default number of steps (ldm.generate and the web page read it from the folder)
    lora_rank: int = 64  # lcm-lora (LCM-LoRA's)
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.method not in DISTILL_METHODS:
            raise ConfigError(f"distill.method='{self.method}' is unknown; valid: {', '.join(DISTILL_METHODS)}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"distill.distance='{self.distance}' is unknown; valid: {', '.join(DISTANCES)}")
        if self.grid < 2:
            raise ConfigError(f"distill.grid={self.grid} must be >= 2 (LCM's is 50)")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ConfigError(f"distill.guidance_min={self.guidance_min}, guidance_max={self.guidance_max}: need 1 <= min <= max")
        if not 0.0 <= self.target_ema < 1.0:
            raise ConfigError(f"distill.target_ema={self.target_ema} must be in [0, 1) (0: the student itself)")
        if self.steps < 1 or self.lora_rank < 1:
            raise ConfigError(f"distill.steps={self.steps} and distill.lora_rank={self.lora_rank} must be >= 1")


@dataclass(frozen=True)
class DistillTrainConfig(RunConfig):
    batch_size: int = 64
    max_steps: int = 400
    lr: float = 1e-4
    lr_schedule: str = "constant_with_warmup"
    lr_warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 25
    checkpoint_every: int = 200
    sample_every: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_stage2_only(self)


@dataclass(frozen=True)
class DistillJobConfig:
    output_dir: str = "runs/distill"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: DistillModelConfig = field(default_factory=DistillModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(scheduler="lcm", steps=4))  # grids at 1, 2 and 4 steps
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: LdmEvalConfig = field(default_factory=lambda: LdmEvalConfig(steps=4))

    def __post_init__(self) -> None:
        if self.data.mask:
            raise ConfigError(
                f"data.mask={self.data.mask} weights the latent model's loss (training.train_ldm), not distillation's"
            )
        if self.data.buckets.enabled:
            raise ConfigError(
                "data.buckets: distillation trains on square crops at data.resolution; set data.buckets.enabled=false"
            )
        if not self.cache.text:
            raise ConfigError("cache.text=false: distillation reads the teacher's caption states from the cache; leave it true")
        if self.eval.guidance != LdmEvalConfig.guidance:
            raise ConfigError(
                f"eval.guidance={self.eval.guidance} would be ignored: a student is evaluated at its own guidance "
                "(distill.guidance for lcm, none for lcm-lora)"
            )
        if self.sample.scheduler != "lcm":
            raise ConfigError(f"sample.scheduler={self.sample.scheduler}: a consistency student samples with lcm")
