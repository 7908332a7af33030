"""``SwapEngine``: write host tensors to files and read them back, asynchronously.

Requests are split into ``block_size`` blocks with up to ``queue_depth`` in flight (io_uring where the kernel
allows it, else a thread pool with pread/pwrite). Tensors whose address, size and file offset are 4096-aligned
go through O_DIRECT (no page cache: the host budget stays honest); others, and filesystems that refuse
O_DIRECT such as tmpfs, use buffered I/O. Each handle holds its tensor until waited for, so a buffer is never
freed or reused while the kernel still reads or writes it.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from memtrain.swap.buffers import ALIGN


class SwapHandle:
    """One transfer in flight. Holds its tensor until the transfer is complete; dropping an unfinished handle
    waits for it first, so the kernel never reads or writes freed memory."""

    def __init__(self, engine: "SwapEngine", handle: int, tensor: torch.Tensor) -> None:
        self._io = engine._io
        self.handle = handle
        self.tensor = tensor
        self._outcome: BaseException | None | bool = False  # False: not waited; None: succeeded; else the error

    def wait(self) -> torch.Tensor:
        """Block until the transfer is complete; raises RuntimeError naming the file if it failed (every time)."""
        if self._outcome is False:
            try:
                self._io.wait(self.handle)
                self._outcome = None
            except RuntimeError as err:
                self._outcome = err
        if self._outcome is not None:
            raise self._outcome
        return self.tensor

    def done(self) -> bool:
        return self._outcome is not False or self._io.done(self.handle)

    def __del__(self) -> None:
        if getattr(self, "_outcome", None) is False:
            try:
                self._io.wait(self.handle)
            except Exception:  # noqa: BLE001 - nobody is left to report to; the bytes are simply not used
                pass


class SwapEngine:
    def __init__(self, queue_depth: int = 8, block_size: int = 2**20, threads: int = 4,
                 backend: str = "auto") -> None:
        try:
            from memtrain import _C
        except ImportError as err:  # only the NVMe tiers need it: the rest of memtrain imports without it
            raise ImportError("memtrain._C, the native swap engine that the NVMe tiers use, is not built: run "
                              "`pip install -e .` in the memtrain checkout (a C++17 compiler is needed; with "
                              "liburing-dev installed it uses io_uring)") from err
        self._io = _C.IOEngine(queue_depth, block_size, threads, backend)

    @property
    def backend(self) -> str:
        return self._io.backend

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu":
            raise ValueError(f"the swap engine moves host tensors; got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError("the swap engine needs a contiguous tensor")
        return tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8).reshape(0)

    def _submit(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int, write: bool) -> SwapHandle:
        data = self._bytes(tensor)
        nbytes = data.numel()
        ptr = data.data_ptr()
        direct = ptr % ALIGN == 0 and nbytes % ALIGN == 0 and offset % ALIGN == 0
        handle = self._io.submit(os.fspath(path), ptr, nbytes, offset, write, direct)
        return SwapHandle(self, handle, tensor)

    def write(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> SwapHandle:
        """Start writing ``tensor``'s bytes to ``path`` at ``offset`` (the file is created if needed)."""
        return self._submit(tensor, path, offset, write=True)

    def read(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> SwapHandle:
        """Start reading ``tensor.nbytes`` bytes of ``path`` at ``offset`` into ``tensor``."""
        return self._submit(tensor, path, offset, write=False)

    def stats(self) -> dict[str, Any]:
        """Bytes, request counts, summed request seconds, the most blocks in flight, O_DIRECT requests."""
        return {"backend": self.backend, **self._io.stats()}
