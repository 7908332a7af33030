"""``ActivationManager``: runs each block's forward under its policy and coordinates swaps across blocks.

Per block, one of: keep (saved tensors stay, counted), recompute (non-reentrant checkpoint), swap (the block's
saved tensors go to the tier in forward and come back in backward), split (MEMO token-wise, see ``split.py``).
In backward, the first time a block's saved tensor is needed (or its recompute starts), the swapped blocks
below it are reloaded ahead of need (``prefetch_blocks`` of them, in reverse block order).

With ``policy="auto"`` (and "split" without a fraction) the first training forward warms up and the second is a
profile: every block swaps (the least memory, and the hooks see every saved tensor), its compute time, saved
bytes and token-parallel share are recorded; the next forward plans (``planner.py``) and runs the plan from then
on. The warm-up's bytes are checked against ``memory_budget`` as its last block's forward ends, so a budget no
plan reaches stops the run before any backward or optimizer update.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from memtrain.activations.arenas import ArenaPool
from memtrain.activations.packet import Packet, SavedRecord, Transfers
from memtrain.activations.recompute import recompute
from memtrain.activations.split import split_forward, token_parallel_children
from memtrain.config import ActivationsConfig
from memtrain.telemetry.saved_tensors import (
    HeldTensor,
    SavedTensorAccounting,
    is_parameter_like,
    storage_bytes,
    storage_key,
)

KINDS = ("keep", "recompute", "swap", "split")


@dataclass(frozen=True)
class BlockPolicy:
    kind: str
    fraction: float | None = None  # split: the share of tokens swapped

    def __str__(self) -> str:
        return f"split({self.fraction:.2f})" if self.kind == "split" else self.kind


@dataclass
class BlockProfile:
    """What one block did in the profiled forward (all blocks swapping)."""

    forward_s: float = 0.0
    token_forward_s: float = 0.0  # inside its token-parallel children
    saved_bytes: int = 0  # distinct storages large enough to move
    small_bytes: int = 0  # kept on the device (below min_bytes)
    token_saved_bytes: int = 0  # of saved_bytes, saved inside token-parallel children
    token_input_bytes: int = 0  # inputs of the token-parallel children (what split keeps for the rest)
    input_bytes: int = 0  # the block's tensor inputs (what recompute keeps)
    input_saved_bytes: int = 0  # of those, what the block saves itself (a rerun re-saves them at no extra cost)
    token_rerun_bytes: int = 0  # the largest token-parallel child's saved bytes beyond its input (a split's rerun)
    move_s: float = 0.0  # measured seconds spent copying out (synchronous copies only)


@dataclass
class Profile:
    blocks: list[BlockProfile] = field(default_factory=list)
    device: str = "cpu"


class _Scope:
    """One block forward under keep / swap / split: the saved-tensor hooks and what they collect."""

    def __init__(self, manager: "ActivationManager", index: int, policy: BlockPolicy,
                 profile: BlockProfile | None, args: tuple[Any, ...] = ()) -> None:
        self.m, self.index, self.policy, self.profile = manager, index, policy, profile
        self.packet: Packet | None = None
        self.in_token = 0
        # Profile only: which saved storages are the block's (or the running token child's) own input.
        inputs = [a for a in args if isinstance(a, torch.Tensor)] if profile is not None else []
        self.input_keys = {storage_key(a) for a in inputs}
        self.child_input_key: Any = None
        self.child_input_saved = 0
        self.hooks: Any = None

    def __enter__(self) -> "_Scope":
        if self.policy.kind in ("swap", "split"):
            self.packet = self.m._new_packet(self.index)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()
        self.m._scope = self
        return self

    def __exit__(self, *exc: Any) -> None:
        self.m._scope = None
        self.hooks.__exit__(*exc)
        if self.packet is not None:
            self.m._close_packet(self.packet)

    def pack(self, t: torch.Tensor) -> Any:
        if is_parameter_like(t) or t.layout != torch.strided or type(t) is not torch.Tensor:
            return t
        nbytes = storage_bytes(t)
        # Kept: small tensors, and those off the compute device (a CPU scalar of a CUDA model).
        if self.packet is None or nbytes < self.m.config.min_bytes or t.device != self.m._device:
            if self.profile is not None:
                self.profile.small_bytes += nbytes
                if storage_key(t) in self.input_keys:
                    self.profile.input_saved_bytes += nbytes
            return HeldTensor(t, self.m.accounting, on_unpack=self._reached)
        before = len(self.packet.slots)
        start = time.perf_counter()
        record = self.packet.add(t)
        if self.profile is not None and len(self.packet.slots) > before:
            self.profile.move_s += time.perf_counter() - start
            self.profile.saved_bytes += nbytes
            key = storage_key(t)
            if key in self.input_keys:
                self.profile.input_saved_bytes += nbytes
            if self.in_token:
                self.profile.token_saved_bytes += nbytes
                if key == self.child_input_key:
                    self.child_input_saved += nbytes
        return record

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, SavedRecord):
            self.m._backward_reaches(self.index)
            return obj.packet.get(obj)
        if isinstance(obj, HeldTensor):
            return obj.take()
        return obj

    def _reached(self) -> None:
        self.m._backward_reaches(self.index)


def _sync(device: torch.device | None) -> None:
    """Wait for the compute stream only: a profiled block's time must not include its own copies, which run on
    the side stream and which the planner costs from the measured bandwidth."""
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _device_of(block: nn.Module, args: tuple[Any, ...]) -> torch.device:
    """Where the block computes: its first tensor input's device, else its parameters'."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


class ActivationManager:
    def __init__(self, blocks: list[nn.Module], config: ActivationsConfig, nvme_path: str | None = None,
                 job: str = "memtrain") -> None:
        if not blocks:
            raise ValueError("activation policies apply per block, and the model has no blocks (sharding.wrap)")
        self.blocks = blocks
        self.config = config
        self.accounting = SavedTensorAccounting()
        # What each block was configured to do; None: the planner chooses (auto), split(None): its fraction too.
        overrides = config.block_policies(len(blocks))  # a selector past the last block fails here, before training
        self.configured = self._configured_policies(config, len(blocks), overrides)
        self.pinned = set(overrides)  # the blocks activations.blocks sets (the plan marks them)
        self.expected = [0] * len(blocks)  # arena bytes per block, from what it saved last time
        self.packets: list[list[Packet]] = [[] for _ in blocks]
        self.transfers: Transfers | None = None
        self.folder = None
        if config.moves_bytes and config.tier == "nvme":
            from memtrain.swap import SwapDirectory

            if nvme_path is None:
                raise ValueError("activations.tier='nvme' needs a folder (activations.nvme_path)")
            self.folder = SwapDirectory(nvme_path, f"{job}-activations")
        self.profile: Profile | None = None
        self.plan: Any = None  # planner.Plan once planned
        # Counts host memory against offload.host_memory_budget (the Engine's OffloadResources.charge): the host
        # arenas are charged at the end of each forward whose arenas changed; over the budget is a ConfigError.
        self.charge_host: Any = None
        self._charged = 0
        # Makes the NVMe tier's swap engine; the Engine hands over the run's own (OffloadResources.io_engine).
        self.io_engine: Any = None
        self._engine: Any = None
        # auto, and split without a fraction, choose from a profiled step (every block swaps in it)
        self._profiling = any(p is None or (p.kind == "split" and p.fraction is None) for p in self.configured)
        self.policies = [BlockPolicy("swap") if self._profiling else p for p in self.configured]
        self._forwards = 0  # training forwards seen while profiling (1: warm-up, 2: profile)
        self._scope: _Scope | None = None
        self._device: torch.device | None = None
        self._originals: list[tuple[nn.Module, Any]] = []
        for index, block in enumerate(blocks):
            self._wrap_block(index, block)
            for child in token_parallel_children(block, config.token_parallel):
                self._wrap_token_child(index, child)

    # -- policies -----------------------------------------------------------------------------------------
    @staticmethod
    def _configured_policies(config: ActivationsConfig, n: int, overrides: dict[int, str]
                             ) -> list[BlockPolicy | None]:
        """``policy`` for every block (the last ``keep_last_blocks`` kept under swap / split), then what
        ``activations.blocks`` sets. None: auto's planner chooses."""
        if config.policy == "auto":
            configured: list[BlockPolicy | None] = [None] * n
        else:
            kind = "keep" if config.policy == "none" else config.policy  # "none" with blocks set: the others kept
            configured = [BlockPolicy(kind, config.swap_fraction if kind == "split" else None) for _ in range(n)]
            if config.policy in ("swap", "split"):
                for i in range(max(0, n - config.keep_last_blocks), n):
                    configured[i] = BlockPolicy("keep")
        for i, kind in overrides.items():
            configured[i] = BlockPolicy(kind, config.swap_fraction if kind == "split" else None)
        return configured

    def set_policies(self, policies: list[BlockPolicy]) -> None:
        if len(policies) != len(self.blocks) or any(p.kind not in KINDS for p in policies):
            raise ValueError(f"one policy per block ({len(self.blocks)}), each one of {KINDS}")
        self.policies = list(policies)

    # -- wrapping -----------------------------------------------------------------------------------------
    def _wrap_block(self, index: int, block: nn.Module) -> None:
        original = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            if self._device is None:
                self._device = _device_of(block, args)  # before the first packet: its copies follow this device
            if index == 0:
                self._step_begins()
            policy = self.policies[index]
            profile = self._block_profile(index, args)
            start = time.perf_counter() if profile is not None else 0.0
            if policy.kind == "recompute":
                out = recompute(original, args, kwargs, self.accounting, lambda: self._backward_reaches(index))
            else:
                with _Scope(self, index, policy, profile, args):
                    out = original(*args, **kwargs)
            if profile is not None:
                _sync(self._device)
                profile.forward_s += time.perf_counter() - start
                if self._forwards == 1 and index == len(self.blocks) - 1:
                    self._check_budget()  # the warm-up forward has seen every block: before any backward or update
            if index == len(self.blocks) - 1:
                self._charge_host_arenas()  # the first forward's is before any backward or update
            if policy.kind in ("keep", "recompute") and self.transfers is not None and self.transfers.in_flight:
                self.transfers.release_sources()  # the block before's copies overlapped this forward; done now
            return out

        block.forward = forward  # instance attribute: FSDP2's hooks still run around it
        self._originals.append((block, original))

    def _wrap_token_child(self, index: int, child: nn.Module) -> None:
        original = child.forward

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            scope = self._scope
            if scope is None or scope.index != index or args or kwargs or not isinstance(x, torch.Tensor):
                return original(x, *args, **kwargs)
            if scope.profile is not None:
                _sync(self._device)
                start = time.perf_counter()
                scope.profile.token_input_bytes += x.numel() * x.element_size()
                saved_before = scope.profile.token_saved_bytes
                scope.child_input_key, scope.child_input_saved = storage_key(x), 0
                scope.in_token += 1
                try:
                    out = original(x)
                finally:
                    scope.in_token -= 1
                    scope.child_input_key = None
                _sync(self._device)
                scope.profile.token_forward_s += time.perf_counter() - start
                rerun = scope.profile.token_saved_bytes - saved_before - scope.child_input_saved
                scope.profile.token_rerun_bytes = max(scope.profile.token_rerun_bytes, rerun)
                return out
            if scope.policy.kind != "split" or x.dim() <= self.config.seq_dim:
                return original(x)
            return split_forward(original, x, scope.policy.fraction or 0.5, self.config.seq_dim, self.accounting,
                                 lambda: self._backward_reaches(index))

        child.forward = forward
        self._originals.append((child, original))

    def remove(self) -> None:
        """Undo the wrapping (the blocks run their own forward again)."""
        for module, _original in self._originals:
            module.__dict__.pop("forward", None)
        self._originals = []
        self.close()

    # -- profile and plan ---------------------------------------------------------------------------------
    def _block_profile(self, index: int, args: tuple[Any, ...]) -> BlockProfile | None:
        if not self._profiling or self.profile is None:
            return None
        prof = self.profile.blocks[index]
        prof.input_bytes += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        _sync(self._device)
        return prof

    def _step_begins(self) -> None:
        """Forward 1 (warm-up) records bytes only: its times include one-off costs (allocations, arenas), but its
        bytes are enough to refuse an unreachable budget before anything is updated. Forward 2 is the profile,
        forward 3 plans."""
        if self.transfers is not None:
            self.transfers.reap()
        if not self._profiling:
            return
        self._forwards += 1
        if self._forwards <= 2:
            self.profile = Profile([BlockProfile() for _ in self.blocks])
            return
        self._profiling = False
        from memtrain.activations.planner import choose_split_fractions, make_plan

        assert self.profile is not None
        self.profile.device = str(self._device)
        self._agree_across_ranks(self.profile)
        plan = make_plan if self.config.policy == "auto" else choose_split_fractions
        self.plan = plan(self.profile, self.config, self._device or torch.device("cpu"), self._bandwidth_probe(),
                         self.configured, self.pinned)
        self.set_policies(self.plan.policies)
        if self.transfers is not None:  # the profile swapped every block: give back the arenas of those that stop
            for i, policy in enumerate(self.policies):
                if policy.kind in ("keep", "recompute"):
                    self.transfers.pool.drop(("block", i))
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank has the same plan: print it once
            print(self.plan.table(), flush=True)

    def _check_budget(self) -> None:
        """End of the warm-up forward: raise ConfigError if no plan reaches ``memory_budget`` (every rank alike)."""
        if self.config.policy != "auto":
            return
        from memtrain.activations.planner import check_budget

        assert self.profile is not None
        self._agree_across_ranks(self.profile)
        check_budget(self.profile, self.config, self._device or torch.device("cpu"), self.configured)

    @staticmethod
    def _agree_across_ranks(profile: Profile) -> None:
        """Every rank plans from the same numbers (the largest any rank measured), so all choose one plan."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return
        names = [f for f in vars(profile.blocks[0])]
        values = torch.tensor([[float(getattr(b, f)) for f in names] for b in profile.blocks], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        for b, row in zip(profile.blocks, values.cpu().tolist()):
            for f, v in zip(names, row):
                setattr(b, f, type(getattr(b, f))(v))

    def _bandwidth_probe(self) -> Any:
        from memtrain.activations.planner import measure_bandwidth

        def probe(nbytes: int) -> tuple[float, float]:
            engine = self._swap_engine() if self.config.tier == "nvme" else None
            return measure_bandwidth(self.config.tier, self._device or torch.device("cpu"), nbytes, self.folder,
                                     engine)

        return probe

    # -- swapping -----------------------------------------------------------------------------------------
    def _swap_engine(self) -> Any:
        """One engine for the packets and the bandwidth probe: the run's (``io_engine``), else, applied alone, one
        with the default settings."""
        if self._engine is None:
            if self.io_engine is not None:
                self._engine = self.io_engine()
            else:
                from memtrain.swap import SwapEngine

                self._engine = SwapEngine()
        return self._engine

    def _new_packet(self, index: int) -> Packet:
        if self.transfers is None:
            device = self._device or torch.device("cpu")
            engine = self._swap_engine() if self.config.tier == "nvme" else None
            self.transfers = Transfers(self.config.tier, device, self.accounting, ArenaPool(pin=device.type == "cuda"),
                                       engine, self.folder)
        used = {int(p.file.stem.rsplit("-", 1)[1]) for p in self.packets[index] if p.file is not None}
        file_index = min(set(range(len(used) + 1)) - used)
        # A block not seen yet starts from the largest block seen (a model's blocks are mostly alike), so in the
        # first step only the first block grows its buffer as it goes.
        expected = self.expected[index] or max(self.expected)
        return Packet(self.transfers, index, expected, file_index, on_release=self._packet_released)

    def _close_packet(self, packet: Packet) -> None:
        fill = packet.close()
        self.expected[packet.block] = max(self.expected[packet.block], fill)
        assert self.transfers is not None
        self.transfers.reap()  # finished NVMe writes give their arenas back
        if packet.live == 0:
            packet.release()
        else:
            self.packets[packet.block].append(packet)

    def _packet_released(self, packet: Packet) -> None:
        if packet in self.packets[packet.block]:
            self.packets[packet.block].remove(packet)

    def _backward_reaches(self, index: int) -> None:
        """Backward needs block ``index`` now: start reloading the swapped blocks below it."""
        if self.transfers is not None and self.transfers.in_flight:
            self.transfers.release_sources()
        for below in range(index - 1, max(-1, index - 1 - self.config.prefetch_blocks), -1):
            for packet in reversed(self.packets[below]):
                if packet.state == "out" and packet.closed:
                    packet.prefetch()
                    break

    def host_arena_bytes(self) -> int:
        """Host memory the swapped activations' buffers hold: the pool's arenas, and the spare buffers of blocks
        seen for the first time (or grown)."""
        if self.transfers is None:
            return 0
        spares = sum(p.spare.numel() for packets in self.packets for p in packets if p.spare is not None)
        return self.transfers.pool.total_bytes + spares

    def _charge_host_arenas(self) -> None:
        nbytes = self.host_arena_bytes()
        if nbytes != self._charged and self.charge_host is not None:
            self.charge_host("activation host arenas", nbytes, "use activations.tier='nvme', or swap fewer blocks "
                                                               "(activations.keep_last_blocks, activations.blocks)")
        self._charged = nbytes

    # -- telemetry ----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.accounting.as_flat_dict())
        out["activations/host_arena_bytes"] = self.host_arena_bytes()
        # Bytes of blocks' activations swapped out and not yet reloaded, on the configured tier.
        out[f"activations/on_{self.config.tier}"] = sum(p.fill for packets in self.packets for p in packets
                                                        if p.state == "out")
        if self.plan is not None:
            out["activations/predicted_peak"] = self.plan.predicted_peak
            out["activations/predicted_step_s"] = self.plan.predicted_time_s
        return out

    def close(self) -> None:
        if self.transfers is not None:
            self.transfers.reap(block=True)
        if self.folder is not None:
            self.folder.remove()
