"""Entry points: ``memtrain-train`` (Hydra + Lightning) and ``memtrain-consolidate``."""
