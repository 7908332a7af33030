"""Where swap files live: one folder per run under ``nvme_path``, checked before training, removed after it.

DeepSpeed names swap files by Python ``id()`` and leaves them behind across runs; here each run owns
``<nvme_path>/memtrain-swap-<job>-<host>-<pid>/``, records its owner, removes the folder at exit, and at start
removes folders of the same job left by processes of this host that no longer exist (killed runs).
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
from pathlib import Path

from memtrain.config import ConfigError

PREFIX = "memtrain-swap-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fmt(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


class SwapDirectory:
    """Create with the bytes the run will write; raises ConfigError naming the problem before any I/O."""

    def __init__(self, nvme_path: str | os.PathLike, job: str, required_bytes: int = 0) -> None:
        root = Path(nvme_path)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"offload.nvme_path={str(root)!r} is a file, not a folder: give a folder on the NVMe drive")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"offload.nvme_path={str(root)!r} cannot be created: {err.strerror}") from err
        self.host = socket.gethostname()
        self.job = "".join(c if c.isalnum() or c in "-_" else "_" for c in job)
        self.removed_stale = self._remove_stale(root)
        free = shutil.disk_usage(root).free
        if required_bytes > free:
            raise ConfigError(
                f"offload.nvme_path={str(root)!r} has {_fmt(free)} free, but the swap files need {_fmt(required_bytes)}: "
                f"free {_fmt(required_bytes - free)} more there, choose another folder, or offload less to NVMe"
            )
        self.path = root / f"{PREFIX}{self.job}-{self.host}-{os.getpid()}"
        try:
            self.path.mkdir()
            (self.path / "owner").write_text(f"{self.host} {os.getpid()}\n")
        except OSError as err:
            raise ConfigError(f"offload.nvme_path={str(root)!r} is not writable: {err.strerror}") from err
        self.required_bytes = required_bytes
        atexit.register(self.remove)

    def _remove_stale(self, root: Path) -> list[Path]:
        removed = []
        for folder in root.glob(f"{PREFIX}{self.job}-*"):
            try:
                host, pid = (folder / "owner").read_text().split()
            except (OSError, ValueError):
                continue  # not ours to judge
            if host == self.host and not _pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def file(self, name: str) -> Path:
        """Path of one swap file in this run's folder."""
        return self.path / name

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        atexit.unregister(self.remove)

    def __enter__(self) -> "SwapDirectory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
