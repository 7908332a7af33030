"""The one typed, validated configuration of memtrain.

Settings flow one way: YAML / keyword arguments -> ``MemTrainConfig.from_dict`` (validated here, once, with
errors that name the key and the allowed values) -> ``memtrain.engine`` -> the ``apply_*`` functions.
One dataclass per capability; later capabilities add their own section.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STAGES = (0, 1, 2, 3)
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is allowed."""


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not valid: {allowed}")


@dataclass(frozen=True)
class ShardingConfig:
    """ZeRO-style sharding on FSDP2.

    stage 0: everything replicated, gradients all-reduced (DDP-equivalent).
    stage 1: optimizer state sharded; parameters and gradients replicated.
    stage 2: + gradients sharded (FSDP2, parameters kept gathered from forward to backward).
    stage 3: + parameters sharded (FSDP2, parameters freed after each block's forward).
    hybrid: shard (at ``stage``, 2 or 3) inside groups of ``shard_size`` ranks, replicate across groups.
    """

    stage: int = 3
    hybrid: bool = False
    # Ranks per shard group when hybrid; None means one node's devices (the launcher's local world size).
    shard_size: int | None = None
    # "auto" (repeated children such as a ModuleList of blocks, or Hugging Face `_no_split_modules`) or
    # a list of block class names; each matching module becomes one FSDP2 group.
    wrap: str | tuple[str, ...] = "auto"
    # FSDP2 mixed precision: dtype of the gathered parameters and of the gradient reduction (None: as stored).
    param_dtype: str | None = None
    reduce_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            raise _err("sharding.stage", self.stage, f"choose one of {list(STAGES)}")
        if not isinstance(self.hybrid, bool):
            raise _err("sharding.hybrid", self.hybrid, "use true or false")
        if self.hybrid and self.stage < 2:
            raise _err(
                "sharding.stage", self.stage, "hybrid sharding shards parameters or gradients: use stage 2 or 3"
            )
        if self.shard_size is not None:
            if not self.hybrid:
                raise _err("sharding.shard_size", self.shard_size, "only meaningful with sharding.hybrid=true")
            if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
                raise _err("sharding.shard_size", self.shard_size, "use a positive integer or null")
        if isinstance(self.wrap, str):
            if self.wrap != "auto":
                raise _err("sharding.wrap", self.wrap, "use 'auto' or a list of block class names")
        else:
            wrap = tuple(self.wrap)
            if not wrap or not all(isinstance(w, str) and w for w in wrap):
                raise _err("sharding.wrap", self.wrap, "use 'auto' or a non-empty list of block class names")
            object.__setattr__(self, "wrap", wrap)
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise _err(f"sharding.{key}", value, f"choose one of {list(DTYPES)} or null")


@dataclass(frozen=True)
class MemTrainConfig:
    """All of memtrain's settings, one section per capability."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)

    @classmethod
    def section_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None) -> "MemTrainConfig":
        """Build from nested plain data (a parsed YAML file, Hydra's config, keyword arguments)."""
        data = dict(data or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}: allowed sections are {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            section_cls = sections[name].default_factory  # type: ignore[misc]
            if isinstance(value, section_cls):
                kwargs[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of settings, got {type(value).__name__}")
            kwargs[name] = _build_section(name, section_cls, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build_section(name: str, section_cls: type, values: Mapping[str, Any]) -> Any:
    allowed = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}: allowed keys are {sorted(allowed)}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return section_cls(**values)
