"""GPU memory and utilization read through NVML (nvidia-ml-py); None where there is no NVIDIA GPU."""
from __future__ import annotations

from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py is optional: CPU-only installs work without it
    pynvml = None

_initialized = False


def _handle(index: int) -> Any:
    """NVML's handle for torch's CUDA device ``index``: found by UUID, since NVML numbers every GPU of the
    machine while torch numbers only those in CUDA_VISIBLE_DEVICES (under Slurm, another job's GPU otherwise)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_readings(index: int) -> dict[str, Any] | None:
    """``{"gpu_memory_used", "gpu_memory_total", "gpu_utilization"}`` for torch's CUDA device ``index``, or None."""
    global _initialized
    if pynvml is None:
        return None
    try:
        if not _initialized:
            pynvml.nvmlInit()
            _initialized = True
        handle = _handle(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
    except pynvml.NVMLError:
        return None
    return {
        "gpu_memory_used": int(memory.used),
        "gpu_memory_total": int(memory.total),
        "gpu_utilization": int(utilization.gpu),
    }
