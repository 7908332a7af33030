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
OFFLOAD_TIERS = ("none", "cpu", "nvme")
IO_BACKENDS = ("auto", "io_uring", "threads")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is allowed."""


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not valid: {allowed}")


def parse_bytes(key: str, value: Any) -> int:
    """``1048576``, ``"64MiB"``, ``"8GiB"``, ``"1.5GB"`` -> bytes; a ConfigError naming ``key`` otherwise."""
    if isinstance(value, bool):
        raise _err(key, value, "use a byte count such as 8589934592 or '8GiB'")
    if isinstance(value, int):
        if value < 1:
            raise _err(key, value, "use a positive byte count")
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:
            count = float(number)
        except ValueError:
            count = -1.0
        if unit in _UNITS and count > 0:
            return int(count * _UNITS[unit])
    raise _err(key, value, "use a byte count such as 8589934592 or a size such as '512MiB', '8GiB', '1.5GB'")


def format_bytes(n: float) -> str:
    """A size people read at a glance: '1.50 GiB', '12.00 MiB', '4.00 KiB', '512 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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
class OffloadConfig:
    """Where the training state lives besides the compute device (ZeRO-Offload / ZeRO-Infinity, Fuyou).

    optimizer: Adam(W) moments on the device ("none"), in host memory ("cpu") or in NVMe files ("nvme"),
        stepped on the CPU tile by tile through the swap pipeline. Stages 1-3.
    params: stage 3's parameter shards in host memory ("cpu") or NVMe files ("nvme"), brought in
        ``prefetch_blocks`` blocks ahead of use in forward and backward and released after. Needs
        ``optimizer`` offloaded too (a parameter is only resident for its block's compute and update).
    optimizer_cpu_fraction: with optimizer="nvme", the share of the optimizer state kept in host memory
        (the first blocks' tiles); the rest is on NVMe. "auto": as much as ``host_memory_budget`` leaves after
        the swap buffers.
    host_memory_budget: the most host memory memtrain's own offload buffers and host-resident state may
        take (bytes or '8GiB'); None: no limit. Checked before training; never exceeded. The activations' host
        arenas count too (checked at the end of the first forward, before any update).
    overlap_backward: step each block's tiles as soon as its gradient shard is reduced, during the rest of
        backward (Fuyou). With gradient clipping the update waits for the global norm.
    tile_size: bytes of each optimizer-state tensor moved per tile.
    queue_depth, block_size, io_threads, io_backend: the run's swap engine (``memtrain.swap``), which the
        activations' NVMe tier uses too.
    """

    optimizer: str = "none"
    params: str = "none"
    nvme_path: str | None = None
    optimizer_cpu_fraction: float | str = 0.0
    host_memory_budget: int | str | None = None
    overlap_backward: bool = True
    prefetch_blocks: int = 1
    tile_size: int | str = "64MiB"
    queue_depth: int = 8
    block_size: int | str = "1MiB"
    io_threads: int = 4
    io_backend: str = "auto"

    def __post_init__(self) -> None:
        for key in ("optimizer", "params"):
            if getattr(self, key) not in OFFLOAD_TIERS:
                raise _err(f"offload.{key}", getattr(self, key), f"choose one of {list(OFFLOAD_TIERS)}")
        if self.params != "none" and self.optimizer == "none":
            raise _err("offload.params", self.params, "parameter offload needs offload.optimizer='cpu' or 'nvme' "
                       "too (a parameter shard is only resident while its block computes and updates)")
        if "nvme" in (self.optimizer, self.params) and not self.nvme_path:
            raise ConfigError("offload.nvme_path is required when offloading to 'nvme': give a folder on the NVMe "
                              "drive (the swap files of each run go into their own folder under it)")
        fraction = self.optimizer_cpu_fraction
        if fraction == "auto":
            if self.host_memory_budget is None:
                raise _err("offload.optimizer_cpu_fraction", fraction, "'auto' fills offload.host_memory_budget: "
                           "set the budget, or give a number between 0 and 1")
        elif isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise _err("offload.optimizer_cpu_fraction", fraction, "use a number between 0 and 1, or 'auto'")
        if fraction and self.optimizer != "nvme":
            raise _err("offload.optimizer_cpu_fraction", fraction, "only meaningful with offload.optimizer='nvme'")
        if self.host_memory_budget is not None:
            object.__setattr__(self, "host_memory_budget", parse_bytes("offload.host_memory_budget",
                                                                       self.host_memory_budget))
        object.__setattr__(self, "tile_size", parse_bytes("offload.tile_size", self.tile_size))
        object.__setattr__(self, "block_size", parse_bytes("offload.block_size", self.block_size))
        if self.block_size % 4096:
            raise _err("offload.block_size", self.block_size, "use a multiple of 4096 bytes (O_DIRECT)")
        if not isinstance(self.overlap_backward, bool):
            raise _err("offload.overlap_backward", self.overlap_backward, "use true or false")
        for key, low in (("prefetch_blocks", 0), ("queue_depth", 1), ("io_threads", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(f"offload.{key}", value, f"use an integer >= {low}")
        if self.io_backend not in IO_BACKENDS:
            raise _err("offload.io_backend", self.io_backend, f"choose one of {list(IO_BACKENDS)}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none"


OUTER_OPTIMIZERS = ("sgd", "nesterov")
COMPRESSIONS = ("none", "bfloat16", "int8")
OUTER_STATE_DEVICES = ("device", "cpu")


@dataclass(frozen=True)
class LocalUpdateConfig:
    """CO2 local updates (``memtrain.local_update``): tau local optimizer steps per replica, then an outer step.

    tau: local steps per outer round; None turns local updates off (the default). Replicas are the replicate
        dimension of the mesh (stages 0-1: every rank; hybrid stages 2-3: every shard group).
    asynchronous: True (CO2): the outer all-reduce runs in the background during the next tau local steps and
        the outer update uses that one-round-stale average. False: the all-reduce waits (local SGD / DiLoCo).
    outer_optimizer: "sgd" (heavy-ball outer momentum, SlowMo / CO2) or "nesterov" (DiLoCo).
    outer_lr, outer_momentum: the outer step size and momentum (1.0 and 0.0: plain periodic averaging).
    staleness_penalty: scale the stale pseudo-gradient down by the gap the model moved since it was taken
        (asynchronous only). outer_clip: element-wise threshold on the outer momentum (None: no clipping).
    compression: what crosses the replica link: "none" (fp32), "bfloat16", or "int8" with per-block scales
        of ``compression_block`` elements.
    outer_state_device: where the anchor and outer momentum live: "device" or "cpu" (saves device memory).
    outer_state_sharding: True: each of the R replicas keeps only its 1/R slice of the anchor, the outer momentum
        and the previous outer step; the round's all-reduce becomes a reduce-scatter, the outer step runs on the
        owned slice, and an all-gather returns the new parameters (in the background, like the all-reduce).
        Composes with outer_state_device and compression (the reduce-scatter is compressed, the all-gather of
        the anchor stays fp32). Resume needs the same replica count.
    """

    # Accepted spelling of keys that are Python keywords (``{"async": True}`` in the examples).
    KEY_ALIASES = {"async": "asynchronous"}

    tau: int | None = None
    asynchronous: bool = True
    outer_optimizer: str = "sgd"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    staleness_penalty: bool = False
    outer_clip: float | None = None
    compression: str = "none"
    compression_block: int = 2048
    outer_state_device: str = "device"
    outer_state_sharding: bool = False

    @property
    def enabled(self) -> bool:
        return self.tau is not None

    def __post_init__(self) -> None:
        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _err(f"local_update.{key}", value, "use a number")
            return float(value)

        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1):
            raise _err("local_update.tau", self.tau, "use a positive integer (local steps per outer round), or null")
        for key in ("asynchronous", "staleness_penalty", "outer_state_sharding"):
            if not isinstance(getattr(self, key), bool):
                raise _err(f"local_update.{key}", getattr(self, key), "use true or false")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise _err("local_update.outer_optimizer", self.outer_optimizer, f"choose one of {list(OUTER_OPTIMIZERS)}")
        if number("outer_lr", self.outer_lr) <= 0:
            raise _err("local_update.outer_lr", self.outer_lr, "use a positive number")
        if not 0.0 <= number("outer_momentum", self.outer_momentum) < 1.0:
            raise _err("local_update.outer_momentum", self.outer_momentum, "use a number in [0, 1)")
        if self.outer_clip is not None and number("outer_clip", self.outer_clip) <= 0:
            raise _err("local_update.outer_clip", self.outer_clip, "use a positive threshold, or null")
        if self.compression not in COMPRESSIONS:
            raise _err("local_update.compression", self.compression, f"choose one of {list(COMPRESSIONS)}")
        block = self.compression_block
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise _err("local_update.compression_block", block, "use a positive integer (elements per int8 scale)")
        if self.outer_state_device not in OUTER_STATE_DEVICES:
            raise _err("local_update.outer_state_device", self.outer_state_device,
                       f"choose one of {list(OUTER_STATE_DEVICES)}")
        if self.staleness_penalty and not self.asynchronous:
            raise _err("local_update.staleness_penalty", True,
                       "the synchronous outer step uses a fresh average, there is no staleness: use false")
        if self.tau is None:  # nothing is silently ignored: settings of a switched-off section are refused
            changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if changed:
                raise _err(f"local_update.{changed[0]}", getattr(self, changed[0]),
                           "local updates are off (local_update.tau=null): set local_update.tau to use it")


ACTIVATION_POLICIES = ("none", "keep", "recompute", "swap", "split", "auto")
BLOCK_POLICIES = ("keep", "recompute", "swap", "split")  # what ``activations.blocks`` may set for a block
ACTIVATION_TIERS = ("cpu", "nvme")


def _selector_items(key: str, text: str) -> list[int | slice]:
    """``"0,3"``, ``"0:4"``, ``"::2"``, ``"-2:"`` -> block indices and slices (Python's meaning, negatives count
    from the last block)."""
    items: list[int | slice] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = part.split(":")
                if len(bounds) > 3:
                    raise ValueError(part)
                start, stop, step = (int(b) if b.strip() else None for b in bounds + [""] * (3 - len(bounds)))
                if step == 0:
                    raise ValueError(part)
                items.append(slice(start, stop, step))
            else:
                items.append(int(part))
        except ValueError:
            raise _err(key, text, "use block indices and Python slices, comma-separated, such as '::2', '0:4', "
                                  "'0,3' or '-1' (the last block)") from None
    return items


@dataclass(frozen=True)
class ActivationsConfig:
    """What happens to each transformer block's saved activations (``memtrain.activations``).

    policy: "none" (memtrain does not touch them), "keep" (kept, but accounted), "recompute" (non-reentrant
        checkpointing of every block), "swap" (moved to ``tier`` in forward, brought back ahead of need in
        backward; the last ``keep_last_blocks`` blocks are kept), "split" (MEMO token-wise: ``swap_fraction`` of
        the tokens' activations of the token-parallel parts swapped, the rest recomputed), "auto" (a planner
        profiles one step and picks per block, to fit ``memory_budget`` at the least predicted step time).
    tier: "cpu" (reused host buffers, page-locked on CUDA) or "nvme" (files through the swap engine, under
        ``nvme_path`` or else ``offload.nvme_path``).
    swap_fraction: split only: the share of tokens swapped (None: the planner's choice, the most that hides).
    memory_budget: auto only (required there): bytes of saved block activations allowed on the compute device,
        a recomputed block's rerun in backward included. A budget no plan reaches is refused at the end of the
        first forward (before any backward or optimizer update), with the smallest reachable budget.
    keep_last_blocks: swap / split: the last blocks stay on the device (their swap could not be hidden).
    min_bytes: saved tensors smaller than this stay on the device. prefetch_blocks: blocks reloaded ahead.
    token_parallel: "auto" (a block's LayerNorm / RMSNorm and *MLP / *FeedForward children) or class names
        of a block's children that act on every token independently (split applies to them).
    seq_dim: the sequence dimension of those children's inputs.
    blocks: per-block policies that override ``policy`` for the blocks they select, as {policy: selector}:
        ``{"recompute": "::2", "keep": "-1"}`` recomputes every other block and keeps the last. A selector is
        block indices and Python slices, comma-separated (or an index, or a list of indices). Blocks not selected
        follow ``policy`` ("none" there: they are kept); under "auto" the planner chooses only for them.
    """

    policy: str = "none"
    tier: str = "cpu"
    swap_fraction: float | None = None
    memory_budget: int | str | None = None
    nvme_path: str | None = None
    keep_last_blocks: int = 1
    min_bytes: int | str = 1024
    prefetch_blocks: int = 1
    token_parallel: str | tuple[str, ...] = "auto"
    seq_dim: int = 1
    blocks: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in ACTIVATION_POLICIES:
            raise _err("activations.policy", self.policy, f"choose one of {list(ACTIVATION_POLICIES)}")
        object.__setattr__(self, "blocks", self._normalized_blocks())
        if self.tier not in ACTIVATION_TIERS:
            raise _err("activations.tier", self.tier, f"choose one of {list(ACTIVATION_TIERS)}")
        fraction = self.swap_fraction
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
                raise _err("activations.swap_fraction", fraction, "use a number strictly between 0 and 1, or null")
            if self.policy != "split" and "split" not in self.blocks:
                raise _err("activations.swap_fraction", fraction, "only meaningful with activations.policy='split' "
                                                                  "(or blocks set to split in activations.blocks)")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes("activations.memory_budget", self.memory_budget))
            if self.policy != "auto":
                raise _err("activations.memory_budget", self.memory_budget,
                           "only meaningful with activations.policy='auto' (the planner fits it)")
        elif self.policy == "auto":
            raise ConfigError("activations.policy='auto' needs activations.memory_budget (bytes or a size such as "
                              "'6GiB'): the planner fits the blocks' saved activations into it")
        object.__setattr__(self, "min_bytes", parse_bytes("activations.min_bytes", self.min_bytes))
        for key, low in (("keep_last_blocks", 0), ("prefetch_blocks", 0), ("seq_dim", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(f"activations.{key}", value, f"use an integer >= {low}")
        if isinstance(self.token_parallel, str):
            if self.token_parallel != "auto":
                raise _err("activations.token_parallel", self.token_parallel,
                           "use 'auto' or a list of class names of a block's token-parallel children")
        else:
            names = tuple(self.token_parallel)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise _err("activations.token_parallel", self.token_parallel,
                           "use 'auto' or a non-empty list of class names")
            object.__setattr__(self, "token_parallel", names)

    def _normalized_blocks(self) -> dict[str, str]:
        given = {} if self.blocks is None else self.blocks
        if not isinstance(given, Mapping):
            raise _err("activations.blocks", given, "use a mapping {policy: selector}, such as {'recompute': '::2'}")
        out: dict[str, str] = {}
        for kind, selector in given.items():
            key = f"activations.blocks.{kind}"
            if kind not in BLOCK_POLICIES:
                raise _err("activations.blocks", dict(given), f"its keys are policies: choose from "
                                                              f"{list(BLOCK_POLICIES)}")
            if isinstance(selector, int) and not isinstance(selector, bool):
                text = str(selector)
            elif isinstance(selector, (list, tuple)) and selector and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in selector):
                text = ",".join(str(i) for i in selector)
            elif isinstance(selector, str) and selector.strip():
                text = selector.strip()
            else:
                raise _err(key, selector, "use block indices and Python slices, such as '::2', '0:4', '0,3', 3 or "
                                          "[0, 3]")
            _selector_items(key, text)
            out[kind] = text
        return out

    def block_policies(self, count: int) -> dict[int, str]:
        """The blocks ``blocks`` sets, as {block index: policy}, for a model of ``count`` blocks. ConfigError for a
        selector past the last block, one that selects nothing, or a block that two policies select."""
        chosen: dict[int, str] = {}
        for kind, text in self.blocks.items():
            key = f"activations.blocks.{kind}"
            indices: list[int] = []
            for item in _selector_items(key, text):
                if isinstance(item, slice):
                    picked = list(range(count))[item]
                    if not picked:
                        raise _err(key, text, f"it selects none of the model's {count} blocks (0-{count - 1})")
                    indices += picked
                elif -count <= item < count:
                    indices.append(item % count)
                else:
                    raise _err(key, text, f"block {item} does not exist: the model has {count} blocks "
                                          f"(0-{count - 1}, or -1 for the last)")
            for i in indices:
                if chosen.get(i, kind) != kind:
                    raise _err(key, text, f"block {i} is selected by activations.blocks.{chosen[i]} as well: give "
                                          f"each block one policy")
                chosen[i] = kind
        return chosen

    @property
    def enabled(self) -> bool:
        return self.policy != "none" or bool(self.blocks)

    @property
    def moves_bytes(self) -> bool:
        return self.policy in ("swap", "split", "auto") or any(k in ("swap", "split") for k in self.blocks)


REDUNDANCIES = ("none", "replica", "xor")


@dataclass(frozen=True)
class CheckpointConfig:
    """Asynchronous in-memory snapshots that survive crashes, and their durable flush (``memtrain.checkpoint``).

    snapshot_every_n_steps: after every n-th optimizer step the sharded training state is copied to host memory
        in the background while the next step computes (0: no snapshots, the default). Training waits only
        before the next optimizer step, and only if the copy has not finished. State offloaded to NVMe is copied
        file to file into ``<offload.nvme_path>/memtrain-snapshots/<job>`` instead (two copies of the swap files'
        size; host memory would not hold it), unless ``redundancy`` is set.
    keeper: the snapshot memory is owned by a keeper process per node (a crashed or killed trainer leaves its
        snapshot behind and the restarted one restores from it). False: the trainer owns it (no crash survival).
    keeper_dir: folder of the keeper's socket (default: ``/tmp/memtrain-<uid>``); keeper_idle_timeout_s: a
        keeper with no trainer attached exits after this many seconds. job_name: names the keeper (default: the
        launcher's job id, SLURM_JOB_ID or torchrun's run id, else "memtrain"); a restarted job must keep it,
        two jobs running at once on one machine must not share it (the keeper refuses a second live trainer
        for the same rank).
    redundancy: "replica": each rank's snapshot is also copied to a rank on the next node, so losing a whole
        node's memory is survivable; "xor": the same with XOR parity over ``parity_group_size`` nodes (one node
        per group may be lost; each rank holds 1/(group size - 1) of a snapshot instead of a whole copy);
        "none": only the own node's keeper holds it.
    dirpath: folder of the durable checkpoints (DCP format, one ``step-<n>`` folder each, committed atomically,
        checksummed). persist_every_n_snapshots: every n-th snapshot is flushed there in the background
        (0: never). keep_latest_k: durable checkpoints kept in ``dirpath`` (older ones are removed).
    """

    snapshot_every_n_steps: int = 0
    keeper: bool = True
    keeper_dir: str | None = None
    keeper_idle_timeout_s: float = 600.0
    job_name: str | None = None
    redundancy: str = "none"
    parity_group_size: int = 3
    dirpath: str | None = None
    persist_every_n_snapshots: int = 0
    keep_latest_k: int = 3

    @property
    def enabled(self) -> bool:
        return self.snapshot_every_n_steps > 0

    def __post_init__(self) -> None:
        for key, low in (("snapshot_every_n_steps", 0), ("persist_every_n_snapshots", 0), ("keep_latest_k", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(f"checkpoint.{key}", value, f"use an integer >= {low}")
        if not isinstance(self.keeper, bool):
            raise _err("checkpoint.keeper", self.keeper, "use true or false")
        timeout = self.keeper_idle_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise _err("checkpoint.keeper_idle_timeout_s", timeout, "use a positive number of seconds")
        size = self.parity_group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise _err("checkpoint.parity_group_size", size, "use an integer >= 2 (nodes per XOR parity group)")
        if self.job_name is not None and (not isinstance(self.job_name, str) or not self.job_name
                                          or "/" in self.job_name):
            raise _err("checkpoint.job_name", self.job_name, "use a non-empty name without '/', or null")
        if self.redundancy not in REDUNDANCIES:
            raise _err("checkpoint.redundancy", self.redundancy, f"choose one of {list(REDUNDANCIES)}")
        if self.persist_every_n_snapshots and not self.dirpath:
            raise ConfigError("checkpoint.persist_every_n_snapshots needs checkpoint.dirpath: the folder the "
                              "durable checkpoints are written to")
        if not self.enabled:  # nothing is silently ignored: settings of a switched-off section are refused
            for name in ("redundancy", "persist_every_n_snapshots"):
                if getattr(self, name) not in ("none", 0):
                    raise _err(f"checkpoint.{name}", getattr(self, name), "snapshots are off "
                               "(checkpoint.snapshot_every_n_steps=0): set checkpoint.snapshot_every_n_steps")
        if self.redundancy != "none" and not self.keeper:
            raise _err("checkpoint.redundancy", self.redundancy, "replicas are held by the peers' keepers: "
                       "set checkpoint.keeper=true")


@dataclass(frozen=True)
class MemTrainConfig:
    """All of memtrain's settings, one section per capability."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    local_update: LocalUpdateConfig = field(default_factory=LocalUpdateConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def activations_nvme_path(self) -> str | None:
        """The folder of the activations' NVMe tier: its own, else the offload section's."""
        return self.activations.nvme_path or self.offload.nvme_path

    def __post_init__(self) -> None:
        if self.activations.moves_bytes and self.activations.tier == "nvme" and not self.activations_nvme_path:
            raise ConfigError("activations.tier='nvme' is not configured: set activations.nvme_path (or "
                              "offload.nvme_path) to a folder on the NVMe drive, or use activations.tier='cpu'")
        if self.offload.enabled and self.sharding.stage == 0:
            raise _err("offload.optimizer", self.offload.optimizer, "optimizer offload needs sharding.stage 1, 2 or 3")
        if self.offload.params != "none" and self.sharding.stage != 3:
            raise _err("offload.params", self.offload.params, "parameter offload needs sharding.stage=3 (at stages "
                       "0-2 every rank keeps the gathered parameters from forward to backward)")
        if self.local_update.enabled and self.offload.enabled:
            raise _err("local_update.tau", self.local_update.tau, "local updates with an offloaded optimizer are not "
                       "supported yet (each replica's own offloaded optimizer state is not checkpointed): set "
                       "offload.optimizer='none' or local_update.tau=null")

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
    aliases = getattr(section_cls, "KEY_ALIASES", {})
    values = {aliases.get(k, k): v for k, v in values.items()}
    allowed = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}: allowed keys are {sorted(allowed)}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return section_cls(**values)
