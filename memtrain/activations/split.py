"""MEMO's token-wise split, made correct for blocks whose attention mixes tokens.

A transformer block is not token-parallel as a whole: attention's output for one token needs every token's keys
and values, so the block cannot simply run on two halves of the sequence. Its *children* mostly are: LayerNorm
/ RMSNorm and the MLP act on each token alone, and they save most of the block's activations (the MLP's hidden
layer is four times the model width). So the split works per token-parallel child:

    input x (batch, T, ...)  ->  x[:, :k] (the first k = round(fraction * T) tokens)  -> child   -> saved tensors
                                                                                                  swapped (the
                                                                                                  block's hooks)
                             ->  x[:, k:] (the other T - k tokens) -> child under non-reentrant checkpoint:
                                                                      only this chunk's input is saved, the
                                                                      rest is recomputed in backward
                             ->  concatenated along the sequence dimension

The recomputed chunk's input is saved by the checkpoint through the block's hooks, so it is swapped too and
comes back (prefetched) before its rerun: on the device the split block holds only tensors below ``min_bytes``.
Everything else the block saves (attention's inputs and outputs, which involve all tokens) is swapped whole by
the block's hooks. Per token the child computes the same function as on the whole sequence, so the result
equals the unsplit block's up to the float rounding a matmul over fewer rows may do differently (a few ulp;
the tests hold it to a tight tolerance). Both chunks are made contiguous, so the swapped chunk's tensors and the
recomputed chunk's input are their own storages (a view would pin, or move, the whole sequence's tensor).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from memtrain.activations.recompute import recompute

_AUTO_SUFFIXES = ("MLP", "FeedForward", "FFN")


def token_parallel_children(block: nn.Module, names: str | tuple[str, ...]) -> list[nn.Module]:
    """The block's direct children that act on each token independently."""
    found = []
    for child in block.children():
        cls = type(child).__name__
        if names == "auto":
            if isinstance(child, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or cls.endswith(_AUTO_SUFFIXES):
                found.append(child)
        elif cls in names:
            found.append(child)
    return found


def split_forward(forward: Callable[..., Any], x: torch.Tensor, fraction: float, seq_dim: int,
                  accounting: Any, on_recompute: Callable[[], None] | None = None) -> torch.Tensor:
    """``forward(x)`` with the first ``fraction`` of the tokens run normally (their saved tensors go wherever
    the surrounding hooks send them) and the rest run under recompute."""
    length = x.shape[seq_dim]
    k = int(round(fraction * length))
    if k <= 0 or k >= length:
        return forward(x) if k > 0 else recompute(forward, (x,), {}, accounting, on_recompute)
    swapped = x.narrow(seq_dim, 0, k).contiguous()
    recomputed = x.narrow(seq_dim, k, length - k).contiguous()
    y_swapped = forward(swapped)
    y_recomputed = recompute(forward, (recomputed,), {}, accounting, on_recompute)
    return torch.cat([y_swapped, y_recomputed], dim=seq_dim)
