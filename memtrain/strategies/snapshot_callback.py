"""The callback that takes memtrain's asynchronous snapshots in a Lightning run (added by MemTrainStrategy).

It runs at the end of each training batch that made an optimizer step, before ModelCheckpoint (the strategy
puts it first), so the snapshot holds exactly what a checkpoint of that moment would: the sharded model and
optimizer state and Lightning's own loop, callback and data state. A ModelCheckpoint save at the same step is
then written from the snapshot in the background (MemTrainStrategy.save_checkpoint).
"""
from __future__ import annotations

import functools
import importlib
import time
from typing import Any


@functools.cache
def snapshot_callback_class(namespace: str) -> type:
    Callback = importlib.import_module(f"{namespace}.callbacks").Callback

    class MemTrainSnapshots(Callback):
        def __init__(self, strategy: Any) -> None:
            self.strategy = strategy
            self._last_step = -1

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            manager = self.strategy.engine.checkpoints
            step = trainer.global_step
            if manager is None or step == self._last_step or step == 0 or not manager.due(step):
                return  # accumulating (no optimizer step since the last batch), or not due
            self._last_step = step
            start = time.perf_counter()
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            tensors, meta, rank_state = self.strategy.split_checkpoint(checkpoint)
            buffers = {f"model.{name}" for name, _ in self.strategy.model.named_buffers()}  # change in forward
            manager.count_stall(time.perf_counter() - start)
            manager.snapshot(step, tensors, meta, rank_state, stable_now=buffers)
            stats = manager.stats
            pl_module.log_dict({"memtrain/snapshot_stall_s": stats.stall_s / max(stats.snapshots, 1),
                                "memtrain/snapshot_step": float(stats.in_memory_step or 0)},
                               on_step=True, on_epoch=False)

    return MemTrainSnapshots

