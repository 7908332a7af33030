"""Recompute: a function run under non-reentrant ``torch.utils.checkpoint``, its retained inputs and its rerun
accounted.

Non-reentrant checkpointing keeps only the function's inputs and reruns it when backward first needs one of
its saved tensors. It composes with the other policies (its own saved-tensor hooks take over inside it), with
FSDP2 (the block's parameters are gathered by FSDP2's pre-backward hook before the rerun, and the rerun calls
the block's forward directly, so no FSDP2 hook runs twice) and with autocast (the autocast state of the forward
is restored for the rerun).

The rerun re-materializes every tensor the function saves, all at once, on top of what backward already holds:
those bytes are counted from the moment the rerun saves them until backward has used them (the tensor dies).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memtrain.telemetry.saved_tensors import SavedTensorAccounting, is_parameter_like, storage_bytes, storage_key


def _hold_until_dead(t: torch.Tensor, accounting: SavedTensorAccounting) -> None:
    key = storage_key(t)
    accounting.hold(key, storage_bytes(t))
    weakref.finalize(t, accounting.release, key)


def _account_retained(args: tuple[Any, ...], accounting: SavedTensorAccounting) -> None:
    """Count the tensor inputs the checkpoint keeps, until the checkpoint lets go of them."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.layout == torch.strided and not isinstance(a, torch.nn.Parameter):
            _hold_until_dead(a, accounting)


@contextmanager
def _count_rerun(accounting: SavedTensorAccounting) -> Any:
    """Inside the rerun, the checkpoint's own hooks store each re-saved tensor: wrap them (they must still run,
    or backward would not find the tensors) and count what they store."""
    # The innermost hooks now are the checkpoint's recomputation hooks (private API, as torch's own AOT code uses).
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    assert top is not None, "entered outside a checkpoint rerun"
    inner_pack, inner_unpack = top

    def pack(t: torch.Tensor) -> Any:
        if t.layout == torch.strided and type(t) is torch.Tensor and not is_parameter_like(t):
            # Detached here as the checkpoint would (it stores what it is given then): the object counted is the
            # one it stores. Counted before its hook runs: the last tensor's pack ends the rerun by raising.
            t = t.detach() if t.requires_grad else t
            _hold_until_dead(t, accounting)
        return inner_pack(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
        yield


def recompute(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              accounting: SavedTensorAccounting, on_recompute: Callable[[], None] | None = None) -> Any:
    """``fn(*args, **kwargs)`` whose saved tensors are recomputed in backward; ``on_recompute`` runs as the rerun
    begins (the manager prefetches the blocks below from there)."""
    _account_retained(args, accounting)

    @contextmanager
    def rerun() -> Any:
        if on_recompute is not None:
            on_recompute()
        with _count_rerun(accounting):
            yield

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), rerun()

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
