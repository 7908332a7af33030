"""A checkpoint folder: DCP shards of the tensors, plus small pickled files for everything else.

Layout of ``<path>/``:
  ``__<rank>_0.distcp``, ``.metadata``  torch.distributed.checkpoint shards (any world size can load them)
  ``meta.pt``                            job-wide values (step, config, Lightning's loop state), from rank 0
  ``rank<r>.pt``                         per-rank values (RNG states, data-loader position)
  ``checksums.json``                     crc32 and size of every file above, checked before loading
The folder is written aside and committed by one rename (``memtrain.checkpoint.durable``): a crash mid-save
leaves the previous checkpoint of that name intact.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from memtrain.checkpoint.durable import load_verified, write_checkpoint

META_FILE = "meta.pt"
DCP_METADATA = ".metadata"


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def save_sharded(
    path: str | Path,
    tensors: dict[str, Any],
    meta: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    group: Any = None,
) -> None:
    """Collective: every rank calls it with its own shards. ``meta`` is taken from rank 0."""
    write_checkpoint(path, tensors, meta, rank_state, group)


def load_sharded(
    path: str | Path, tensors: dict[str, Any], group: Any = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: verify, then read the shards into ``tensors`` (in place). Returns (meta, this rank's state or None).

    The rank state is None when the checkpoint was written by a different world size (its per-rank
    values, such as the data position, then do not apply).
    """
    path = Path(path)
    if not is_complete_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete memtrain checkpoint (no {DCP_METADATA} in it)")
    load_verified(path, tensors, group)
    meta = torch.load(path / META_FILE, weights_only=False) if (path / META_FILE).is_file() else {}
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    rank_file = path / f"rank{rank}.pt"
    same_world = meta.get("world_size", world) == world
    rank_state = torch.load(rank_file, weights_only=False) if same_world and rank_file.is_file() else None
    return meta, rank_state


def consolidate(path: str | Path, output: str | Path, key: str = "model", strip_prefix: str = "") -> dict[str, Any]:
    """Gather the ``key`` part of a sharded checkpoint into one plain state dict file (single process)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_complete_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete memtrain checkpoint (no {DCP_METADATA} in it)")
    loaded: dict[str, Any] = {}
    _load_state_dict(
        loaded,
        storage_reader=dcp.FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={key}),
        no_dist=True,
    )
    if key not in loaded:
        raise KeyError(f"{path} holds no '{key}' entry; it holds {sorted(loaded)}")
    state = {
        (k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k): v
        for k, v in loaded[key].items()
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, output)
    return state
