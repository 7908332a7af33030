"""The swap pipeline's Python face: asynchronous tensor <-> file I/O (``memtrain._C``) and reused host buffers.

One engine serves offload (parameters, optimizer tiles), activations and the checkpoint flush; it owns the
host buffer pool and the I/O queue, so the host budget stays one number.
"""
from memtrain.swap.buffers import HostBufferPool, aligned_empty
from memtrain.swap.engine import SwapEngine, SwapHandle
from memtrain.swap.files import SwapDirectory

__all__ = ["HostBufferPool", "SwapDirectory", "SwapEngine", "SwapHandle", "aligned_empty"]
