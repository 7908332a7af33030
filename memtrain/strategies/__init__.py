"""The Lightning layer: ``MemTrainStrategy``, its registered names, and the telemetry callback.

The only part of memtrain that imports Lightning. ``lightning.pytorch`` and ``pytorch_lightning`` are separate
namespaces with separate registries, so the strategy is registered in each one that is installed.
"""
from __future__ import annotations

import importlib.util
from typing import Any

# The staleness gap penalty stays off: on the CO2 benchmark it cost loss at every length measured (BENCHMARKS.md, CO2).
CO2_DEFAULTS: dict[str, Any] = {"tau": 12, "outer_momentum": 0.2, "staleness_penalty": False, "outer_clip": 1.0,
                                "asynchronous": True}

# name -> (description, init kwargs)
REGISTERED_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "memtrain": ("memtrain, ZeRO-3 (parameters, gradients and optimizer state sharded)", {"zero_stage": 3}),
    "memtrain_zero1": ("memtrain, ZeRO-1 (optimizer state sharded)", {"zero_stage": 1}),
    "memtrain_zero2": ("memtrain, ZeRO-2 (gradients and optimizer state sharded)", {"zero_stage": 2}),
    "memtrain_zero3": ("memtrain, ZeRO-3 (parameters, gradients and optimizer state sharded)", {"zero_stage": 3}),
    "memtrain_hybrid": ("memtrain, ZeRO-3 inside a node, replicated across nodes", {"zero_stage": 3, "hybrid": True}),
    "memtrain_co2": (
        "memtrain, CO2 local updates across replicas (every rank a replica), all-reduce hidden behind 12 local steps",
        {"zero_stage": 0, "local_update": dict(CO2_DEFAULTS)},
    ),
    "memtrain_co2_hybrid": (
        "memtrain, ZeRO-3 inside a node, CO2 local updates across nodes (all-reduce hidden behind 12 local steps)",
        {"zero_stage": 3, "hybrid": True, "local_update": dict(CO2_DEFAULTS)},
    ),
    "memtrain_zero3_offload": (
        "memtrain, ZeRO-3 with parameters and optimizer state in host memory (optimizer stepped on the CPU)",
        {"zero_stage": 3, "offload_params": "cpu", "offload_optimizer": "cpu"},
    ),
    "memtrain_zero3_nvme": (
        "memtrain, ZeRO-3 with parameters and optimizer state on NVMe (folder: nvme_path= or $MEMTRAIN_NVME_PATH)",
        {"zero_stage": 3, "offload_params": "nvme", "offload_optimizer": "nvme", "nvme_path": "$MEMTRAIN_NVME_PATH"},
    ),
}


def _installed(namespace: str) -> bool:
    try:
        return importlib.util.find_spec(namespace) is not None
    except (ImportError, ValueError):
        return False


def register_strategies() -> list[str]:
    """Register the strategy names in every installed Lightning namespace; returns the names to export."""
    exported: list[str] = []
    for namespace in ("lightning.pytorch", "pytorch_lightning"):
        if not _installed(namespace.split(".")[0]) or not _installed(namespace):
            continue
        from memtrain.strategies.strategy import strategy_class

        cls = strategy_class(namespace)
        registry = importlib.import_module(f"{namespace}.strategies").StrategyRegistry
        for name, (description, kwargs) in REGISTERED_NAMES.items():
            if name not in registry:
                registry.register(name, cls, description=description, **kwargs)
        if namespace == "lightning.pytorch":
            exported += ["MemTrainStrategy", "MemTrainTelemetry"]
    return exported


def __getattr__(name: str) -> Any:
    if name == "MemTrainStrategy":
        from memtrain.strategies.strategy import strategy_class

        return strategy_class("lightning.pytorch")
    if name == "MemTrainTelemetry":
        from memtrain.strategies.telemetry_callback import telemetry_callback_class

        return telemetry_callback_class("lightning.pytorch")
    raise AttributeError(f"module 'memtrain.strategies' has no attribute {name!r}")
