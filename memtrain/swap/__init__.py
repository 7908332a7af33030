"""The swap pipeline's Python face: asynchronous tensor <-> file I/O (``memtrain._C``) and reused host buffers.

A run made by ``memtrain.Engine`` has one engine (``OffloadResources.io_engine``, with the offload section's I/O
settings): offloaded parameters, optimizer tiles and the activations' NVMe tier share its I/O queue. Host
buffers (``HostBufferPool`` for offload, the activations' arenas) all count against one host budget,
``offload.host_memory_budget``.
"""
from memtrain.swap.buffers import HostBufferPool, aligned_empty
from memtrain.swap.engine import SwapEngine, SwapHandle
from memtrain.swap.files import SwapDirectory

__all__ = ["HostBufferPool", "SwapDirectory", "SwapEngine", "SwapHandle", "aligned_empty"]
