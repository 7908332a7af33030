"""Reference models for the default job, the tests and the benchmarks."""
from memtrain.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
