"""``MemTrainTelemetry``: a Lightning callback that logs memtrain's per-tier byte accounting and throughput."""
from __future__ import annotations

import functools
import importlib
import time
from typing import Any

import torch

from memtrain.telemetry import account_training_state, gpu_readings, peak_memory_bytes


def _batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the first tensor's element count (an (input, target) pair counts the input)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value.numel()
    return 0


@functools.cache
def telemetry_callback_class(namespace: str) -> type:
    Callback = importlib.import_module(f"{namespace}.callbacks").Callback

    class MemTrainTelemetry(Callback):
        """Every ``every_n_steps`` optimizer steps, log bytes of params / grads / optimizer state per tier,
        tokens/s (all ranks together), peak process memory and, on NVIDIA GPUs, NVML memory and utilization.

        After ``fit``, ``summary`` holds the last figures (this rank's bytes; job-wide tokens/s).
        """

        def __init__(self, every_n_steps: int = 10) -> None:
            if every_n_steps < 1:
                raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
            self.every_n_steps = every_n_steps
            self.summary: dict[str, float] = {}
            self._tokens = 0
            self._start: float | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._tokens, self._start = 0, time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._tokens += _batch_tokens(batch) * trainer.world_size
            last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
            if trainer.global_step % self.every_n_steps != 0 and not last:
                return
            # Measured at a batch end, where this step's gradients and optimizer state both exist.
            figures = self.measure(trainer, pl_module)
            pl_module.log_dict({f"memtrain/{k}": float(v) for k, v in figures.items()}, rank_zero_only=True)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.summary["tokens_per_s"] = self._tokens_per_s()

        def _tokens_per_s(self) -> float:
            elapsed = time.perf_counter() - (self._start or time.perf_counter())
            return self._tokens / elapsed if elapsed > 0 else 0.0

        def measure(self, trainer: Any, pl_module: Any) -> dict[str, float]:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            report = account_training_state(pl_module, optimizer)
            figures: dict[str, float] = {f"{k}_bytes": v for k, v in report.as_flat_dict().items()}
            figures["tokens_per_s"] = self._tokens_per_s()
            device = trainer.strategy.root_device
            figures["peak_memory_bytes"] = peak_memory_bytes(device)
            if device.type == "cuda":
                figures.update(gpu_readings(device.index or 0) or {})
            swap = getattr(getattr(trainer.strategy, "_engine", None), "offload", None)
            if swap is not None and swap.engine is not None:  # the offload's I/O counters, cumulative
                stats = swap.engine.stats()
                for key in ("bytes_read", "bytes_written", "read_seconds", "write_seconds", "max_blocks_in_flight"):
                    figures[f"swap_{key}"] = float(stats[key])
            activations = getattr(getattr(trainer.strategy, "_engine", None), "activations", None)
            if activations is not None:  # saved-activation bytes on the device now / at the peak, moved per tier
                figures.update({k.replace("/", "_").removesuffix("_bytes") + "_bytes": float(v)
                                for k, v in activations.metrics().items() if not k.endswith("_s")})
            self.summary = figures
            return figures

    MemTrainTelemetry.__module__ = __name__
    return MemTrainTelemetry
