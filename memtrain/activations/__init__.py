"""Activation memory: per block keep / recompute / swap to CPU or NVMe / MEMO token-wise split, and a planner.

    apply_activations(model, config.activations, wrap=...)  -> ActivationManager (or None for policy "none")

Files: ``manager.py`` (runs each block under its policy, prefetches in backward), ``packet.py`` (one block's
swapped storages and their copies), ``arenas.py`` (reused host buffers), ``recompute.py`` (non-reentrant
checkpoint), ``split.py`` (token-wise split), ``planner.py`` (profile -> per-block plan), ``apply.py``.
"""
from memtrain.activations.apply import activations_of, apply_activations
from memtrain.activations.manager import ActivationManager, BlockPolicy

__all__ = ["ActivationManager", "BlockPolicy", "activations_of", "apply_activations"]
