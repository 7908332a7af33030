"""GPU memory and utilization read through NVML (nvidia-ml-py); None where there is no NVIDIA GPU."""
from __future__ import annotations

from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py is optional: CPU-only installs work without it
    pynvml = None

_initialized = False


def gpu_readings(index: int) -> dict[str, Any] | None:
    """``{"gpu_memory_used", "gpu_memory_total", "gpu_utilization"}`` for device ``index``, or None."""
    global _initialized
    if pynvml is None:
        return None
    try:
        if not _initialized:
            pynvml.nvmlInit()
            _initialized = True
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
    except pynvml.NVMLError:
        return None
    return {
        "gpu_memory_used": int(memory.used),
        "gpu_memory_total": int(memory.total),
        "gpu_utilization": int(utilization.gpu),
    }
