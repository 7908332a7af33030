"""Which submodules become their own FSDP2 group (a "block"): named classes, or found automatically."""
from __future__ import annotations

from collections import Counter

import torch.nn as nn

from memtrain.config import ConfigError


def find_blocks(model: nn.Module, wrap: str | tuple[str, ...]) -> list[nn.Module]:
    """Modules to shard one by one, in forward order, outermost first.

    ``wrap="auto"``: the model's Hugging Face ``_no_split_modules`` classes if it declares them, else the
    children of every ``ModuleList`` / ``Sequential`` whose members repeat one class (transformer blocks).
    A list of class names wraps every module of those classes; a name that matches nothing is an error,
    since a silent miss would leave the whole model in one group.
    """
    if wrap == "auto":
        names = _no_split_module_names(model)
        return _modules_of_classes(model, names) if names else _repeated_children(model)
    blocks = _modules_of_classes(model, set(wrap))
    found = {type(m).__name__ for m in blocks}
    missing = sorted(set(wrap) - found)
    if missing:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"sharding.wrap names {missing}, which are not in the model; its classes are {present}")
    return blocks


def _no_split_module_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _modules_of_classes(model: nn.Module, class_names: set[str]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for module in model.modules():
        if module is model or type(module).__name__ not in class_names:
            continue
        if any(_contains(outer, module) for outer in blocks):
            continue  # nested inside a block already chosen: it shards with its parent
        blocks.append(module)
    return blocks


def _repeated_children(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        counts = Counter(type(child) for child in module)
        cls, n = counts.most_common(1)[0]
        if n < 2 or not any(p.requires_grad for p in module.parameters()):
            continue
        for child in module:
            if type(child) is cls and not any(_contains(outer, child) for outer in blocks):
                blocks.append(child)
    return blocks


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def find_large_modules(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Modules outside the blocks that hold at least as many parameters of their own as the largest block
    (a language model's embedding and output head). As their own groups, the head's update can start as soon
    as backward begins, and no group is several blocks large (offload sizes its buffers by the largest)."""
    if not blocks:
        return []
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    found = []
    for module in model.modules():
        if module is model or any(_contains(b, module) for b in blocks):
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own >= largest:
            found.append(module)
    return found
