"""Snapshots of state that lives on NVMe (offloaded parameters and optimizer state): written to a snapshot file
beside the swap files, never through host memory.

Offloaded state on NVMe is larger than host memory by design, so its snapshot cannot sit in the keeper's memory.
Each tensor that is a view of a swap file's mapping is copied file to file by the kernel (``copy_file_range``:
no user-space buffer; a reflink where the file system has them) into the snapshot file of the keeper slot being
written, at the offset its layout entry gives. The slot's header, in the keeper's memory, is committed after
that copy and invalidated before the file is rewritten, so the file belongs to the step the header names. A
trainer killed mid-step leaves both behind; a lost node loses both (use the durable tier for that).
"""
from __future__ import annotations

import bisect
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from memtrain.config import ConfigError


class FileRanges:
    """Where tensors that view a file mapping sit in their files: (path, byte offset) by address."""

    def __init__(self, mappings: Iterable[tuple[torch.Tensor, Path]]) -> None:
        spans = sorted((m.data_ptr(), m.data_ptr() + m.numel() * m.element_size(), Path(p)) for m, p in mappings)
        self._starts = [s for s, _, _ in spans]
        self._spans = spans

    def find(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        if not self._spans or tensor.numel() == 0 or not tensor.is_contiguous() or tensor.device.type != "cpu":
            return None
        ptr = tensor.data_ptr()
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        start, end, path = self._spans[i]
        return (path, ptr - start) if ptr + tensor.numel() * tensor.element_size() <= end else None


class SnapshotFiles:
    """One snapshot file per keeper slot of this rank, in ``folder`` (on the NVMe drive of the swap files)."""

    def __init__(self, folder: Path, mappings: Callable[[], list[tuple[torch.Tensor, Path]]]) -> None:
        self.folder = folder
        self._mappings = mappings  # the swap files' current mappings (made lazily by the offload engines)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def check_room(self, slots: Iterable[str]) -> None:
        """Each slot's file can take a copy of every swap file (at most): refused before training otherwise."""
        names = list(slots)
        need = len(names) * sum(p.stat().st_size for _, p in self._mappings())
        have = shutil.disk_usage(self.folder).free + sum(self.path(n).stat().st_size for n in names
                                                         if self.path(n).exists())
        if need > have:
            raise ConfigError(
                f"snapshots of the state offloaded to NVMe need {need / 2**30:.2f} GiB in {self.folder} (a copy per "
                f"keeper slot, beside the swap files) but {have / 2**30:.2f} GiB are free: free space there, or "
                "set checkpoint.redundancy (the snapshots then go through the keeper's host memory), or turn "
                "snapshots off (checkpoint.snapshot_every_n_steps=0)")

    def ranges(self) -> FileRanges:
        return FileRanges(self._mappings())

    def path(self, slot_name: str) -> Path:
        return self.folder / (slot_name.replace("/", "-") + ".bin")

    def write(self, slot_name: str, size: int, copies: list[tuple[Path, int, int, int]]) -> None:
        """Into the slot's file: ``(source file, source offset, file offset, bytes)`` each."""
        with _opened(self.path(slot_name), os.O_RDWR | os.O_CREAT) as fd:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            _copy_ranges(fd, copies, into_slot=True)

    def read(self, slot_name: str, size: int, copies: list[tuple[Path, int, int, int]]) -> None:
        """Back out of the slot's file: ``(destination file, destination offset, file offset, bytes)`` each."""
        with _opened(self.path(slot_name), os.O_RDONLY) as fd:
            if os.fstat(fd).st_size < size:
                raise FileNotFoundError(f"snapshot file {self.path(slot_name)} is shorter than its snapshot "
                                        f"({os.fstat(fd).st_size} < {size} bytes)")
            _copy_ranges(fd, copies, into_slot=False)

    def usable(self, slot_name: str, size: int) -> bool:
        try:
            return self.path(slot_name).stat().st_size >= size
        except FileNotFoundError:
            return False

    def remove(self, slot_names: Iterable[str]) -> None:
        for name in slot_names:
            self.path(name).unlink(missing_ok=True)

    def mapping(self, slot_name: str, size: int) -> torch.Tensor:
        """The slot's file as bytes (a shared mapping: the page cache, not heap), for a durable flush to read."""
        return torch.from_file(str(self.path(slot_name)), shared=True, size=size, dtype=torch.uint8)


@contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def _copy_ranges(slot_fd: int, copies: list[tuple[Path, int, int, int]], into_slot: bool) -> None:
    """``(other file, its offset, slot file offset, bytes)``: copied into the slot's file, or out of it (each
    other file opened once, however many tensors it holds)."""
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for other, other_offset, offset, nbytes in copies:
            if other not in fds:
                fds[other] = stack.enter_context(_opened(other, os.O_RDONLY if into_slot else os.O_WRONLY))
            if into_slot:
                _copy_range(fds[other], slot_fd, nbytes, other_offset, offset)
            else:
                _copy_range(slot_fd, fds[other], nbytes, offset, other_offset)


def _copy_range(src: int, dst: int, nbytes: int, src_offset: int, dst_offset: int) -> None:
    while nbytes > 0:
        done = os.copy_file_range(src, dst, nbytes, src_offset, dst_offset)
        if done == 0:
            raise OSError(f"copy_file_range copied nothing with {nbytes} bytes left (source shorter than expected)")
        nbytes, src_offset, dst_offset = nbytes - done, src_offset + done, dst_offset + done
