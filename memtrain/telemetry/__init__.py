"""Per-tier byte accounting of training state, process memory, and GPU readings through NVML."""
from memtrain.telemetry.accounting import MemoryReport, account_training_state
from memtrain.telemetry.nvml import gpu_readings
from memtrain.telemetry.process import peak_memory_bytes
from memtrain.telemetry.saved_tensors import SavedTensorAccounting, count_saved_tensors

__all__ = ["MemoryReport", "SavedTensorAccounting", "account_training_state", "count_saved_tensors", "gpu_readings",
           "peak_memory_bytes"]
