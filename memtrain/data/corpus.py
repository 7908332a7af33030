"""Byte-level training text built from the Python standard library's ``.py`` files.

Every Python installation carries these files, so the default job, the tests and the benchmarks need no
download. The files are read in sorted order, so the corpus is the same on every rank of a job.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset


def build_stdlib_corpus(max_bytes: int = 8 * 2**20, root: str | Path | None = None) -> torch.Tensor:
    """Concatenate stdlib sources (sorted by path) into a uint8 tensor of at most ``max_bytes`` bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"no .py files found under {root}; pass data.root=<a folder of text files>")
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class ByteCorpus(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes; item i is (input ids, next-byte targets)."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if data.numel() < seq_len + 1:
            raise ValueError(f"corpus of {data.numel()} bytes is shorter than one window of {seq_len + 1}")
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]

    def split(self, val_fraction: float) -> tuple["ByteCorpus", "ByteCorpus"]:
        """Train / validation split by position (the tail is validation)."""
        cut = int(self.data.numel() * (1 - val_fraction))
        return ByteCorpus(self.data[:cut], self.seq_len), ByteCorpus(self.data[cut:], self.seq_len)
