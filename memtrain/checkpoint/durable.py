"""Durable checkpoint folders: written aside, checksummed, committed by one atomic rename, verified on read.

    <dir>/.<name>.tmp/   while being written (a crash leaves it behind; it is never read and is cleaned later)
    <dir>/<name>/        committed: DCP shards + .metadata, meta.pt, rank<r>.pt, checksums.json (crc32 + size
                         of every other file, written last)

Committing an existing name swaps the two folders in one step (renameat2 RENAME_EXCHANGE), so ``last`` is
always either the old or the new checkpoint. Every collective step ends with the ranks agreeing on errors, so
one rank's full disk fails the write on all of them instead of leaving the others waiting.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException

CHECKSUMS = "checksums.json"
STEP_NAME = re.compile(r"^step-(\d+)$")
_RENAME_EXCHANGE = 2
_CHUNK = 8 << 20


class CheckpointWriteError(OSError):
    """A durable checkpoint could not be written (no room, no permission); nothing committed was touched."""


class CorruptCheckpointError(ValueError):
    """A committed checkpoint's file is missing or fails its checksum."""


def _rank(group: Any) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _world(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _gather(value: Any, group: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _agree(error: BaseException | None, group: Any, what: str) -> None:
    """Collective: raise CheckpointWriteError on every rank if any rank failed."""
    errors = [e for e in _gather(None if error is None else f"{type(error).__name__}: {error}", group) if e]
    if errors:
        raise CheckpointWriteError(f"{what} failed: {errors[0]}")


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def commit_folder(tmp: Path, final: Path) -> None:
    """Make ``tmp`` appear as ``final`` in one step (replacing a committed ``final`` atomically)."""
    if final.exists():
        if not _exchange(tmp, final):  # no renameat2 here: a short window where ``final`` is missing
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def write_checkpoint(
    path: str | Path,
    tensors: dict[str, Any],
    meta: dict[str, Any] | None,
    rank_state: dict[str, Any] | None,
    group: Any = None,
) -> None:
    """Collective over ``group``: every rank passes its own shards; ``meta`` is taken from rank 0, with the
    group's world size added."""
    from memtrain.checkpoint.sharded import META_FILE, atomic_torch_save

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    rank = _rank(group)
    error: BaseException | None = None
    if rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    _agree(error, group, f"creating {tmp}")
    try:
        try:
            if rank_state is not None:
                atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
            if rank == 0:  # the world size too: rank states apply only at the one that wrote them
                atomic_torch_save({**(meta or {}), "world_size": _world(group)}, tmp / META_FILE)
        except OSError as e:
            error = e
        _agree(error, group, f"writing {tmp}")
        # Local updates (their state is in rank_state): replicas differ between outer steps, and DCP would take
        # each replicated tensor from whichever rank has written least, a patchwork no replica ever held. From
        # the lowest rank instead, the checkpoint holds replica 0 whole, its optimizer state with it.
        replicas_differ = rank_state is not None and "local_update" in rank_state
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True) if replicas_differ else None
        try:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), planner=planner,
                     process_group=group)
        except (Exception, CheckpointException) as e:  # DCP raises on every rank when one fails (a BaseException)
            raise CheckpointWriteError(f"writing the shards of {final} failed: {e}") from e
        own = {}
        try:  # each rank checksums the files it wrote
            for file in tmp.iterdir():
                if re.match(rf"^__{rank}_\d+\.distcp$", file.name) or file.name == f"rank{rank}.pt":
                    own[file.name] = {"crc32": crc32_file(file), "size": file.stat().st_size}
        except OSError as e:
            error = e
        _agree(error, group, f"checksumming {tmp}")
        sums = {k: v for part in _gather(own, group) for k, v in part.items()}
        if rank == 0:
            try:
                for name in (".metadata", META_FILE):
                    if (tmp / name).is_file():
                        sums[name] = {"crc32": crc32_file(tmp / name), "size": (tmp / name).stat().st_size}
                atomic_write_bytes(json.dumps(sums, indent=1, sort_keys=True).encode(), tmp / CHECKSUMS)
                fsync_dir(tmp)
                commit_folder(tmp, final)
            except OSError as e:
                error = e
        _agree(error, group, f"committing {final}")
    except CheckpointWriteError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(path: str | Path, group: Any = None) -> None:
    """Collective: each rank checks a share of the files; CorruptCheckpointError on every rank if any fails."""
    path = Path(path)
    problem: str | None = None
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        sums, problem = {}, f"{path / CHECKSUMS} is missing or unreadable ({e})"
    rank, world = _rank(group), _world(group)
    for name in sorted(sums)[rank::world]:
        if problem:
            break
        file = path / name
        if not file.is_file():
            problem = f"{file} is missing"
        elif file.stat().st_size != sums[name]["size"] or crc32_file(file) != sums[name]["crc32"]:
            problem = f"{file} fails its checksum (the file is corrupt)"
    problems = [p for p in _gather(problem, group) if p]
    if problems:
        raise CorruptCheckpointError(problems[0])


def is_committed(path: str | Path) -> bool:
    return (Path(path) / CHECKSUMS).is_file()


def committed_steps(dirpath: str | Path) -> list[tuple[int, Path]]:
    """Committed ``step-<n>`` folders in ``dirpath``, newest first."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    found = []
    for entry in dirpath.iterdir():
        match = STEP_NAME.match(entry.name)
        if match and is_committed(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def step_path(dirpath: str | Path, step: int) -> Path:
    return Path(dirpath) / f"step-{step}"


def retain(dirpath: str | Path, keep: int) -> list[Path]:
    """Remove committed step folders beyond the newest ``keep`` and abandoned temporary ones (rank 0 only)."""
    committed = committed_steps(dirpath)
    removed = [p for _, p in committed[keep:]]
    newest = committed[0][0] if committed else None
    for entry in Path(dirpath).iterdir():
        match = re.match(r"^\.step-(\d+)\.tmp$", entry.name)
        if match and newest is not None and int(match.group(1)) < newest:  # older than a commit: abandoned
            removed.append(entry)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def load_verified(path: str | Path, tensors: dict[str, Any], group: Any = None) -> None:
    """Verify the checksums (when the folder has them), then read the shards into ``tensors`` in place."""
    if is_committed(path):
        verify(path, group)
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(Path(path)), process_group=group)
