"""Peer redundancy: each rank's snapshot also lives in the keeper of a rank on the next node.

Rank r sends every committed snapshot to ``buddy(r) = (r + ranks_per_node) % world`` and holds the snapshot
of ``(r - ranks_per_node) % world``, in two alternating replica slots (a node lost mid-transfer leaves the
previous replica complete). Losing one node's memory (trainer and keeper) is then survivable: its ranks get
their snapshots back from the next node. Transfers run on the checkpoint's own gloo group, on the snapshot
thread, while training goes on.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from memtrain.checkpoint.slots import Slot, SlotHeader, SlotStore, segment_size

REPLICA_SLOTS = 2


def buddy(rank: int, world: int, ranks_per_node: int) -> int:
    """The rank holding ``rank``'s replica."""
    return (rank + ranks_per_node) % world


def replica_source(rank: int, world: int, ranks_per_node: int) -> int:
    """The rank whose replica ``rank`` holds."""
    return (rank - ranks_per_node) % world


def replica_name(source: int, index: int) -> str:
    return f"rank{source}/replica/{index}"


def _header_tensor(header: SlotHeader) -> torch.Tensor:
    digest = torch.frombuffer(bytearray(header.digest.encode()), dtype=torch.uint8).to(torch.int64)
    fixed = torch.tensor([header.step, header.data_bytes, header.blob_bytes, header.blob_crc], dtype=torch.int64)
    return torch.cat([fixed, digest])


def _header_of(values: torch.Tensor) -> SlotHeader:
    step, data_bytes, blob_bytes, crc = (int(v) for v in values[:4])
    digest = bytes(values[4:].to(torch.uint8).tolist()).decode()
    return SlotHeader(step, data_bytes, blob_bytes, crc, digest)


class Replicator:
    def __init__(self, store: SlotStore, rank: int, world: int, ranks_per_node: int, group: Any) -> None:
        self.store, self.rank, self.world, self.group = store, rank, world, group
        self.send_to = buddy(rank, world, ranks_per_node)
        self.recv_from = replica_source(rank, world, ranks_per_node)
        self._next = 0

    def _names(self) -> list[str]:
        return [replica_name(self.recv_from, i) for i in range(REPLICA_SLOTS)]

    def exchange(self, own: Slot, header: SlotHeader) -> int:
        """Send ``own`` (committed at ``header``) to the buddy; receive and commit the source's. Returns its step."""
        outgoing = _header_tensor(header)
        incoming = torch.empty_like(outgoing)
        self._pairwise(outgoing, incoming)
        theirs = _header_of(incoming)
        replica = self.store.open_oldest(self._names(), segment_size(theirs.data_bytes, theirs.blob_bytes))
        replica.begin_write()
        self._pairwise(own.payload(header.data_bytes, header.blob_bytes),
                       replica.payload(theirs.data_bytes, theirs.blob_bytes))
        replica.commit(theirs.step, theirs.data_bytes, theirs.blob_bytes, theirs.blob_crc, theirs.digest)
        return theirs.step

    def _pairwise(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        ops = [dist.P2POp(dist.isend, send, self.send_to, self.group),
               dist.P2POp(dist.irecv, recv, self.recv_from, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def held(self) -> dict[int, Slot]:
        """The complete replicas held here, by step."""
        return self.store.committed(self._names())


def transfer(slot: Slot | None, header: SlotHeader | None, src: int, dst: int, rank: int,
             open_dest: Callable[[SlotHeader], Slot], group: Any) -> SlotHeader | None:
    """Recovery: rank ``src`` sends a replica (header, then payload) to rank ``dst``, which writes it into the
    slot ``open_dest(header)`` gives and commits it there (so its own keeper holds it again)."""
    if rank == src:
        assert slot is not None and header is not None
        dist.send(_header_tensor(header), dst, group=group)
        dist.send(slot.payload(header.data_bytes, header.blob_bytes), dst, group=group)
        return header
    if rank == dst:
        values = torch.empty(4 + 32, dtype=torch.int64)
        dist.recv(values, src, group=group)
        theirs = _header_of(values)
        dest = open_dest(theirs)
        dest.begin_write()
        dist.recv(dest.payload(theirs.data_bytes, theirs.blob_bytes), src, group=group)
        dest.commit(theirs.step, theirs.data_bytes, theirs.blob_bytes, theirs.blob_crc, theirs.digest)
        return theirs
    return None
