"""An offline byte-level corpus (the Python standard library's own sources) and its samplers."""
from memtrain.data.corpus import ByteCorpus, build_stdlib_corpus
from memtrain.data.sampler import ResumableDistributedSampler

__all__ = ["ByteCorpus", "build_stdlib_corpus", "ResumableDistributedSampler"]
