"""Make freed tensor memory go back to the operating system, so RSS follows what is really in use.

glibc serves an allocation from its heaps once a chunk of that size has been freed (its mmap threshold grows
with the largest freed chunk, up to 32 MiB), and keeps freed heap memory for reuse: a training step that
frees and reallocates block-sized tensors then holds several copies' worth of RSS that nobody uses. With a
host memory budget set, memtrain fixes the threshold at 1 MiB: larger tensors are mapped when allocated and
unmapped when freed. The cost is a page fault per 4 KiB touched of each new large tensor.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20
_done = False


def return_freed_memory_to_os() -> bool:
    """Set glibc's mmap threshold once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) != 1:
        return False
    logging.getLogger("memtrain").info("memtrain: glibc mmap threshold set to 1 MiB (host memory budget)")
    _done = True
    return True
