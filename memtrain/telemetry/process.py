"""Peak memory of this process: the CUDA caching allocator's peak on GPU, resident set size on CPU."""
from __future__ import annotations

import resource

import torch


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the high-water mark of the resident set since the process started.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
