"""Strict, typed job configs: frozen dataclasses <- YAML <- dotted ``key=value`` overrides.

OmegaConf structured configs do the type checking; this module turns their errors into
messages that name the bad key and list what would be valid, before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from runtime.errors import InputError, RunError  # noqa: F401  (RunError: imported from here by the jobs)

T = TypeVar("T")


class ConfigError(InputError):
    """A config file or override that does not match the job's schema."""


class MixedPrecision(str, enum.Enum):
    """Autocast precision; fp32 weights are always kept as the master copy.

    ``auto`` is bf16 where bf16 is fast (CUDA with bf16, a CPU whose bf16 convolution measured faster), else fp32.
    """

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    def accelerate_name(self, device: str) -> str:
        """The ``Accelerator(mixed_precision=...)`` value for this choice on ``device``."""
        if self is MixedPrecision.auto:
            from runtime import fast_bf16

            return "bf16" if fast_bf16(device) else "no"
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.value]

    def reason(self, device: str) -> str:
        """Why this precision runs on ``device`` (for the run log and metrics.json)."""
        if self is not MixedPrecision.auto:
            return f"train.mixed_precision={self.value}"
        if str(device).startswith("cuda"):
            return "auto: CUDA" + (" with bf16" if self.accelerate_name(device) == "bf16" else " without bf16")
        from runtime.hardware import FAST_BF16, bf16_decision

        speedup, how = bf16_decision()
        return f"auto: {how} ({'>=' if speedup >= FAST_BF16 else '<'} {FAST_BF16}x)"


def _node_at(schema: type, dotted: str) -> type | None:
    """The dataclass type that holds the parent of ``dotted`` (None if the path is not a dataclass)."""
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    return node if dataclasses.is_dataclass(node) else None


def _explain(schema: type, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    holder = _node_at(schema, key)
    valid = ", ".join(f.name for f in dataclasses.fields(holder)) if holder else ""
    first = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return ConfigError(f"unknown config key '{key}'. Valid keys under {parent}: {valid}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}': {first}")
    return ConfigError(f"config key '{key}': {first}")


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from defaults, then the YAML file, then ``key=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
        layers.append(OmegaConf.create(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(schema, err) from None


def to_dict(cfg: Any) -> dict:
    """Plain-data view of a config (enums as their values), for logs and saved run configs."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_cli(schema: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """``--config FILE key=value ...`` -> a validated config."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file (keys as in the dataclass schema)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    try:
        return load_config(schema, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
