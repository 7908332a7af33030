"""Import a DeepSpeed JSON config, so DeepSpeed users can switch with the file they have.

    imported = from_deepspeed("ds_config.json")
    MemTrainStrategy(imported.config)          # + Trainer(**imported.trainer_kwargs)

Every key is accounted for: what has a memtrain meaning is mapped (``zero_optimization``, its ``offload_*`` and
``aio`` sections to the ``sharding`` and ``offload`` sections; clipping, accumulation and precision to Trainer
arguments); DeepSpeed tuning knobs that memtrain sizes by itself are listed in ``notes`` (printed, never
silently dropped); anything whose meaning memtrain does not have is refused with a ConfigError naming the key.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrain.config import ConfigError, MemTrainConfig

# Buckets, persistence thresholds and the like: memtrain sizes its own (per block, per tile).
_TUNING = {
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "allgather_partitions",
    "reduce_scatter", "round_robin_gradients", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "memory_efficient_linear", "load_from_fp32_weights",
    "elastic_checkpoint", "ignore_unused_parameters",
}
_OFFLOAD_TUNING = {"pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init"}
_AIO_TUNING = {"single_submit", "overlap_events"}
# Top-level keys that belong to the training script (DataLoader, configure_optimizers), not to the strategy.
_SCRIPT = {"train_batch_size", "train_micro_batch_size_per_gpu", "optimizer", "scheduler", "steps_per_print",
           "wall_clock_breakdown", "dump_state", "prescale_gradients", "gradient_predivide_factor"}


@dataclass
class ImportedDeepSpeedConfig:
    config: MemTrainConfig
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"DeepSpeed config key {key}={value!r} has no memtrain equivalent: {why}")


def _offload_section(kind: str, section: Mapping[str, Any], offload: dict[str, Any], notes: list[str]) -> None:
    target = "params" if kind == "offload_param" else "optimizer"
    for key, value in section.items():
        name = f"zero_optimization.{kind}.{key}"
        if key == "device":
            if value not in ("none", "cpu", "nvme", None):
                raise _refuse(name, value, "use 'none', 'cpu' or 'nvme'")
            offload[target] = value or "none"
        elif key == "nvme_path":
            if offload.get("nvme_path") not in (None, value):
                raise ConfigError(f"{name}={value!r}: memtrain keeps parameters and optimizer state under one "
                                  f"nvme_path, but the other offload section names {offload['nvme_path']!r}")
            offload["nvme_path"] = value
        elif key == "ratio":
            if value != 1:
                raise _refuse(name, value, "a partial CPU update (Twin-Flow) is not implemented; memtrain's "
                              "offload.optimizer_cpu_fraction splits where the state is stored, not where it is updated")
        elif key in _OFFLOAD_TUNING:
            notes.append(f"{name}={value!r}: memtrain sizes its own buffers (offload.prefetch_blocks, tile_size, "
                         "host_memory_budget); not used")
        else:
            raise _refuse(name, value, "unknown offload setting")


def from_deepspeed(source: str | os.PathLike | Mapping[str, Any]) -> ImportedDeepSpeedConfig:
    data = dict(source) if isinstance(source, Mapping) else json.loads(Path(source).read_text())
    notes: list[str] = []
    sharding: dict[str, Any] = {}
    offload: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for key, value in data.items():
        if key == "zero_optimization":
            for zkey, zvalue in value.items():
                name = f"zero_optimization.{zkey}"
                if zkey == "stage":
                    sharding["stage"] = zvalue
                elif zkey in ("offload_param", "offload_optimizer"):
                    _offload_section(zkey, zvalue or {}, offload, notes)
                elif zkey in ("cpu_offload", "cpu_offload_params"):
                    raise _refuse(name, zvalue, "use offload_optimizer / offload_param with device 'cpu'")
                elif zkey == "sub_group_size":
                    offload["tile_size"] = int(zvalue) * 4  # elements of fp32 state per optimizer step unit
                elif zkey == "stage3_gather_16bit_weights_on_model_save":
                    notes.append(f"{name}: memtrain-consolidate writes a whole-model state dict from any checkpoint")
                elif zkey in _TUNING:
                    notes.append(f"{name}={zvalue!r}: memtrain sizes its own communication buckets; not used")
                else:
                    raise _refuse(name, zvalue, "not a setting memtrain has")
        elif key == "aio":
            mapping = {"block_size": "block_size", "queue_depth": "queue_depth", "thread_count": "io_threads"}
            for akey, avalue in value.items():
                if akey in mapping:
                    offload[mapping[akey]] = avalue
                elif akey == "use_gds" and avalue:
                    raise _refuse("aio.use_gds", avalue, "GPUDirect Storage is not implemented")
                elif akey in _AIO_TUNING or akey == "use_gds":
                    notes.append(f"aio.{akey}={avalue!r}: memtrain always overlaps I/O with compute; not used")
                else:
                    raise _refuse(f"aio.{akey}", avalue, "not an I/O setting memtrain has")
        elif key == "gradient_clipping":
            trainer["gradient_clip_val"] = value
        elif key == "gradient_accumulation_steps":
            trainer["accumulate_grad_batches"] = value
        elif key == "bf16":
            if value.get("enabled"):
                trainer["precision"] = "bf16-mixed"
        elif key == "fp16":
            if value.get("enabled"):
                raise _refuse("fp16.enabled", True, "fp16 loss scaling is not supported (per-shard overflow checks "
                              "could disagree across ranks); use bf16")
        elif key in _SCRIPT:
            notes.append(f"{key}: set this in the training script (DataLoader batch size, configure_optimizers)")
        else:
            raise _refuse(key, value, "not a setting memtrain has")
    sharding.setdefault("stage", 0)  # DeepSpeed's default when zero_optimization.stage is absent
    sections: dict[str, Any] = {"sharding": sharding}
    if offload:
        offload.setdefault("optimizer", "none")
        sections["offload"] = offload
    return ImportedDeepSpeedConfig(MemTrainConfig.from_dict(sections), trainer, notes)
