"""Recompute: a function run under non-reentrant ``torch.utils.checkpoint``, its retained inputs accounted.

Non-reentrant checkpointing keeps only the function's inputs and reruns it when backward first needs one of
its saved tensors. It composes with the other policies (its own saved-tensor hooks take over inside it), with
FSDP2 (the block's parameters are gathered by FSDP2's pre-backward hook before the rerun, and the rerun calls
the block's forward directly, so no FSDP2 hook runs twice) and with autocast (the autocast state of the forward
is restored for the rerun).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memtrain.telemetry.saved_tensors import SavedTensorAccounting, storage_bytes, storage_key


def _account_retained(args: tuple[Any, ...], accounting: SavedTensorAccounting) -> None:
    """Count the tensor inputs the checkpoint keeps, until the checkpoint lets go of them."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.layout == torch.strided and not isinstance(a, torch.nn.Parameter):
            key = storage_key(a)
            accounting.hold(key, storage_bytes(a))
            weakref.finalize(a, accounting.release, key)


def recompute(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              accounting: SavedTensorAccounting, on_recompute: Callable[[], None] | None = None) -> Any:
    """``fn(*args, **kwargs)`` whose saved tensors are recomputed in backward; ``on_recompute`` runs as the rerun
    begins (the manager prefetches the blocks below from there)."""
    _account_retained(args, accounting)

    @contextmanager
    def rerun() -> Any:
        if on_recompute is not None:
            on_recompute()
        yield

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), rerun()

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
