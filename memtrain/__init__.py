"""memtrain: train models that do not fit.

Public API: ``MemTrainConfig`` (validated settings), ``Engine`` (applies the techniques), and, when
Lightning is installed, ``MemTrainStrategy`` with the registered strategy names ``"memtrain"``,
``"memtrain_zero1"``, ``"memtrain_zero2"``, ``"memtrain_zero3"`` and ``"memtrain_hybrid"``.
"""
from memtrain.config import ConfigError, MemTrainConfig, ShardingConfig
from memtrain.engine import Engine

__all__ = ["ConfigError", "Engine", "MemTrainConfig", "ShardingConfig"]
__version__ = "0.1.0"

from memtrain.strategies import register_strategies as _register_strategies

__all__ += _register_strategies()


def __getattr__(name: str):  # MemTrainStrategy / MemTrainTelemetry, only where Lightning is installed
    if name in __all__:
        import memtrain.strategies

        return getattr(memtrain.strategies, name)
    raise AttributeError(f"module 'memtrain' has no attribute {name!r}")
