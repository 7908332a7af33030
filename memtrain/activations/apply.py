"""``apply_activations``: put a model's blocks under the configured activation policy (before sharding)."""
from __future__ import annotations

import torch.nn as nn

from memtrain.activations.manager import ActivationManager
from memtrain.config import ActivationsConfig
from memtrain.sharding.wrap import find_blocks

_ATTR = "_memtrain_activations"


def apply_activations(model: nn.Module, config: ActivationsConfig, wrap: str | tuple[str, ...] = "auto",
                      nvme_path: str | None = None, job: str = "memtrain") -> ActivationManager | None:
    """Wrap each block's forward (found like the sharding groups, ``sharding.wrap``); None when policy is "none".

    Applied before sharding: FSDP2's hooks then run around the wrapped forward, so a recomputed block's
    parameters are gathered for its rerun by FSDP2's pre-backward hook."""
    if not config.enabled:
        return None
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("activation policies are already applied to this model")
    manager = ActivationManager(find_blocks(model, wrap), config, nvme_path or config.nvme_path, job)
    object.__setattr__(model, _ATTR, manager)  # not a submodule: plain attribute
    return manager


def activations_of(model: nn.Module) -> ActivationManager | None:
    return getattr(model, _ATTR, None)
