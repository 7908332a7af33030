"""XOR parity across nodes: losing one node's memory is survivable at 1/(g-1) of a snapshot's size per rank.

The ranks with the same local rank on g consecutive nodes form a parity group. Each member's snapshot payload
(tensor bytes and per-rank values) is cut into g-1 chunks of C bytes (zero-padded to the group's longest).
Member j holds the parity block

    P_j = XOR over members k != j of chunk (j - k - 1) mod g of member k's payload

so each member's chunks are spread over the g-1 others, one chunk per holder. A lost member m gets chunk c back
from holder j = (m + 1 + c) mod g: XOR of P_j with the survivors' own chunks that P_j covers. Both directions are
one ``reduce(BXOR)`` per holder over the group's gloo group. Parity blocks alternate between two slots, like the
own snapshots, so a node lost while parity is being built leaves the previous step's parity complete. Each
parity slot also keeps every member's snapshot header (step, sizes, checksum, layout digest).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from memtrain.checkpoint.redundancy import _header_of, _header_tensor
from memtrain.checkpoint.slots import Slot, SlotHeader, SlotStore, segment_size

PARITY_SLOTS = 2
_HEADER_WORDS = 4 + 32  # int64 words of one snapshot header on the wire (see redundancy._header_tensor)


def parity_name(rank: int, index: int) -> str:
    return f"rank{rank}/parity/{index}"


def parity_groups(world: int, ranks_per_node: int, group_size: int) -> list[list[int]]:
    """Members of every parity group: the same local rank on ``group_size`` consecutive nodes."""
    nodes = world // ranks_per_node
    return [[(first + i) * ranks_per_node + local for i in range(group_size)]
            for first in range(0, nodes, group_size) for local in range(ranks_per_node)]


def chunk_of(holder: int, member: int, size: int) -> int:
    """Which chunk of ``member``'s payload the parity block of ``holder`` (both group indices) covers."""
    return (holder - member - 1) % size


class ParityGroup:
    """This rank's part in its parity group. Built on every rank in the same order (it creates gloo groups)."""

    def __init__(self, store: SlotStore, rank: int, world: int, ranks_per_node: int, group_size: int) -> None:
        self.store, self.rank = store, rank
        self.members: list[int] = []
        self.group: Any = None
        for members in parity_groups(world, ranks_per_node, group_size):
            group = dist.new_group(members, backend="gloo")  # collective: every rank creates every group
            if rank in members:
                self.members, self.group = members, group
        self.size = len(self.members)
        self.index = self.members.index(rank)

    # -- building parity after a snapshot ----------------------------------------------------------------------
    def _chunk_bytes(self, payload_bytes: int) -> int:
        longest = torch.tensor([payload_bytes], dtype=torch.int64)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
        chunk = -(-int(longest) // (self.size - 1))
        return -(-chunk // 8) * 8  # whole int64 words: the XOR runs on int64

    def _chunk(self, payload: torch.Tensor, index: int, chunk: int) -> torch.Tensor:
        """Chunk ``index`` of a payload, zero-padded to ``chunk`` bytes, as int64 words."""
        out = torch.zeros(chunk, dtype=torch.uint8)
        part = payload[index * chunk:(index + 1) * chunk]
        out[:part.numel()] = part
        return out.view(torch.int64)

    def _names(self) -> list[str]:
        return [parity_name(self.rank, i) for i in range(PARITY_SLOTS)]

    def build(self, own: Slot, header: SlotHeader) -> int:
        """Collective over the group (snapshot thread): this member's parity block for ``header.step``."""
        headers = [torch.empty(_HEADER_WORDS, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(headers, _header_tensor(header), group=self.group)
        payload = own.payload(header.data_bytes, header.blob_bytes)
        chunk = self._chunk_bytes(payload.numel())
        table = torch.cat(headers).view(torch.uint8)
        slot = self.store.open_oldest(self._names(), segment_size(chunk, table.numel()))
        slot.begin_write()
        block = slot.payload(chunk, 0).view(torch.int64)
        for holder in range(self.size):
            if holder == self.index:
                block.zero_()
                dist.reduce(block, self.members[holder], op=dist.ReduceOp.BXOR, group=self.group)
            else:
                mine = self._chunk(payload, chunk_of(holder, self.index, self.size), chunk)
                dist.reduce(mine, self.members[holder], op=dist.ReduceOp.BXOR, group=self.group)
        slot.write_blob(chunk, table.numpy().tobytes())
        slot.commit(header.step, chunk, table.numel(), 0, header.digest)
        return header.step

    # -- recovery ----------------------------------------------------------------------------------------------
    def held(self) -> dict[int, Slot]:
        """Complete parity blocks held here, by step."""
        return self.store.committed(self._names())

    def member_header(self, parity: Slot, member_index: int) -> SlotHeader:
        header = parity.header()
        assert header is not None
        start = 4096 + header.data_bytes + member_index * _HEADER_WORDS * 8
        words = parity.flat[start:start + _HEADER_WORDS * 8].clone().view(torch.int64)
        return _header_of(words)

    def rebuild(self, lost: int, own: Slot | None, parity: Slot | None, open_lost: Any) -> SlotHeader | None:
        """Collective over the group: member ``lost`` (a group index) gets its payload back from the others'
        parity blocks and own snapshots of one step (``own`` and ``parity``: this member's, of that step). On the lost member, ``open_lost(header)`` gives the own slot to
        write; it returns the restored header there (None elsewhere)."""
        if self.index != lost:
            assert parity is not None and own is not None
            theirs = self.member_header(parity, lost)
            chunk = parity.header().data_bytes  # type: ignore[union-attr]
            mine = own.header()
            assert mine is not None
            payload = own.payload(mine.data_bytes, mine.blob_bytes)
        table = torch.empty(_HEADER_WORDS, dtype=torch.int64)
        if self.index != lost:
            table.copy_(_header_tensor(theirs))
        source = self.members[(lost + 1) % self.size]  # any survivor: they all hold the lost member's header
        dist.broadcast(table, source, group=self.group)
        sizes = torch.tensor([chunk if self.index != lost else 0], dtype=torch.int64)
        dist.broadcast(sizes, source, group=self.group)
        theirs, chunk = _header_of(table), int(sizes)
        dest = open_lost(theirs) if self.index == lost else None
        if dest is not None:
            dest.begin_write()
        length = theirs.data_bytes + theirs.blob_bytes
        for c in range(self.size - 1):
            holder = (lost + 1 + c) % self.size
            if self.index == lost:
                piece = torch.zeros(chunk // 8, dtype=torch.int64)
            elif self.index == holder:
                piece = parity.payload(chunk, 0).view(torch.int64).clone()  # type: ignore[union-attr]
            else:
                piece = self._chunk(payload, chunk_of(holder, self.index, self.size), chunk)
            dist.reduce(piece, self.members[lost], op=dist.ReduceOp.BXOR, group=self.group)
            if dest is not None:
                start = c * chunk
                part = piece.view(torch.uint8)[:max(0, min(chunk, length - start))]
                dest.payload(theirs.data_bytes, theirs.blob_bytes)[start:start + part.numel()] = part
        if dest is None:
            return None
        dest.commit(theirs.step, theirs.data_bytes, theirs.blob_bytes, theirs.blob_crc, theirs.digest)
        return theirs
