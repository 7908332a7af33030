"""``OffloadedAdam``: the user's Adam/AdamW, stepped on the CPU tile by tile from state kept off the device.

The user's optimizer object stays (learning-rate schedulers and Lightning keep working on its
``param_groups``); its ``step`` is replaced. The moments live in a ``StateStore`` (host memory and/or NVMe);
each step walks the units (one per FSDP2 block at stages 2-3) and, inside a unit, the tiles: read ahead, update
with torch's fused CPU Adam(W) kernel (``torch._fused_adam_`` / ``torch._fused_adamw_``; measured against
DeepSpeed's CPU Adam by ``scripts/bench/cpu_adam.py``), write behind.

Overlap (``offload.overlap_backward``, stages 2-3): a block's gradient shard is final once FSDP2 has reduced it
in backward, so its update is queued right then, on one optimizer thread, while backward goes on with the
blocks before it (Fuyou). The gradient is freed after the update. With global-norm clipping the update needs
the norm of all gradients: backward then only sums each block's squared gradient shard as it is reduced, and
``step`` clips and updates every block afterwards (exact; the overlap is lost for that step).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from memtrain.offload.params import ParamOffload, ParamUnit
from memtrain.offload.staging import DeviceStaging
from memtrain.offload.store import StateStore
from memtrain.offload.views import dtensor_like
from memtrain.sharding.zero1 import zero1_state

KEYS = ("exp_avg", "exp_avg_sq")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class Entry:
    fqn: str
    param: torch.Tensor  # what the optimizer steps (a DTensor shard, or a tensor)
    group: int  # index into optimizer.param_groups
    start: int  # element offset inside its unit
    numel: int


@dataclass
class Unit:
    name: str
    entries: list[Entry]
    fsdp_group: Any = None  # FSDPParamGroup whose reduced gradients trigger the overlapped update
    params: ParamUnit | None = None  # when the parameters themselves are on NVMe

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)


def check_supported(optimizer: torch.optim.Optimizer) -> bool:
    """True for AdamW-style (decoupled) decay, False for Adam; a clear error for anything else."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(
            f"optimizer offload steps Adam and AdamW on the CPU; got {type(optimizer).__name__}. Use "
            "torch.optim.AdamW (or Adam), or set offload.optimizer='none'"
        )
    for i, group in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize", "differentiable", "capturable"):
            if group.get(key):
                raise ValueError(f"optimizer offload does not support {key}=True (param group {i})")
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.param_groups[0].get("decoupled_weight_decay"))


class OffloadedAdam:
    def __init__(self, optimizer: torch.optim.Optimizer, units: list[Unit], store: StateStore,
                 params: ParamOffload | None, overlap: bool, dp_group: dist.ProcessGroup | None,
                 max_grad_norm: float | None = None) -> None:
        self.decoupled = check_supported(optimizer)
        if optimizer.state:
            raise RuntimeError("offload the optimizer before its first step (it already has state)")
        self.optimizer = optimizer
        self.units = units
        self.store = store
        self.params = params
        self.overlap = overlap and all(u.fsdp_group is not None for u in units)
        self.dp_group = dp_group
        self.max_grad_norm = max_grad_norm
        self.steps: dict[str, torch.Tensor] = {}  # fqn -> step count (float32 0-d, as torch keeps it)
        self._worker = None
        if self.overlap:
            device = units[0].fsdp_group.device if units else torch.device("cpu")
            # The worker's CUDA calls (current_stream, staging) must use this rank's GPU, not device 0.
            init = (torch.cuda.set_device, (device,)) if device.type == "cuda" else (None, ())
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memtrain-optimizer", initializer=init[0],
                                              initargs=init[1])
        self._pending: list[Future] = []
        self._stepped_in_backward: set[int] = set()
        self._sq_norms: dict[int, torch.Tensor] = {}
        self._staging: DeviceStaging | None = None  # made on the first update of parameters on a GPU
        # Called before any state is updated (a pending checkpoint snapshot must finish copying first).
        self.before_update: Callable[[], None] | None = None
        zero1 = zero1_state(optimizer)
        if zero1 is not None:  # ZeRO-1 sets this rank's shards and their gradients up, we step them, it gathers
            zero1._inner_step = self.step_units
        else:
            optimizer.step = self.step  # type: ignore[method-assign]
        optimizer._memtrain_offload = self  # type: ignore[attr-defined]
        if self.overlap:
            for i, unit in enumerate(units):
                self._hook_post_backward(i, unit)

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_units()
        return loss

    def step_units(self) -> None:
        """Update every unit not already updated during backward; then the step is complete."""
        try:
            self._wait_pending()
            clip = self._clip_coefficient()
            for i, unit in enumerate(self.units):
                if i not in self._stepped_in_backward:
                    self._update(unit, clip)
            self.store.flush()
            if self.params is not None:
                self.params.drop_holds()
                self.params.flush()
                self.params.end_of_step()
        finally:
            self._stepped_in_backward.clear()
            self._sq_norms.clear()

    def _clip_coefficient(self) -> float | None:
        if self.max_grad_norm is None:
            return None
        if self._stepped_in_backward:
            raise RuntimeError("internal: blocks were updated before the gradient norm was known")
        sq = torch.zeros((), dtype=torch.float64)
        for i, unit in enumerate(self.units):
            sq += self._sq_norms[i] if i in self._sq_norms else self._unit_sq_norm(unit)
        if self.dp_group is not None:
            # On the mesh's device, not the host: the group may have no CPU backend (NCCL only).
            device = _collective_device(self.units)
            reduced = sq.to(device)
            dist.all_reduce(reduced, group=self.dp_group)
            sq = reduced.cpu()
        self.last_grad_norm = math.sqrt(sq.item())
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when that is below 1.
        coef = self.max_grad_norm / (self.last_grad_norm + 1e-6)
        return coef if coef < 1.0 else None

    @staticmethod
    def _unit_sq_norm(unit: Unit) -> torch.Tensor:
        # Per-tensor norms, then their squares summed in float64 (as clip_grad_norm_ combines per-tensor norms);
        # no float64 copy of a gradient is ever made.
        sq = torch.zeros((), dtype=torch.float64)
        for e in unit.entries:
            if e.param.grad is not None:
                sq += torch.linalg.vector_norm(_local(e.param.grad)).double().cpu() ** 2
        return sq

    @torch.no_grad()
    def _update(self, unit: Unit, clip: float | None, free_grads: bool = False) -> None:
        index = self.units.index(unit)
        live = [e for e in unit.entries if e.param.grad is not None]
        if not live:
            return
        if self.before_update is not None:
            self.before_update()
        if unit.params is not None and self.params is not None:
            self.params.for_update(unit.params)
        try:
            for e in live:
                step = self.steps.setdefault(e.fqn, torch.zeros((), dtype=torch.float32))
                step += 1
            if _local(live[0].param).device.type == "cuda":
                self._update_device_tiles(index, live, clip)
            else:
                for tile in self.store.tiles(index):
                    for e, lo, hi, at in _segments(live, tile.start, tile.numel):
                        param = _local(e.param).view(-1)[lo:hi]
                        grad = _local(e.param.grad).view(-1)[lo:hi]
                        self._adam(e, param, grad, tile.tensors, at, clip)
        finally:
            if unit.params is not None and self.params is not None:
                self.params.release(unit.params, dirty=True)
        if free_grads:
            for e in live:
                e.param.grad = None

    def _update_device_tiles(self, index: int, live: list[Entry], clip: float | None) -> None:
        """Parameters and gradients on the GPU: each tile's slices are staged through page-locked buffers, the
        next tile's device->host copies running while this tile is updated (see ``staging.py``)."""
        if self._staging is None:
            self._staging = DeviceStaging(self.store.max_tile_elems, _local(live[0].param).device)
        staging = self._staging
        spans = self.store.spans(index)

        def fetch(i: int) -> tuple[list[tuple[Entry, int, int, int]], Any]:
            segments = _segments(live, *spans[i])
            pairs = [(_local(e.param).view(-1)[lo:hi], _local(e.param.grad).view(-1)[lo:hi])
                     for e, lo, hi, _ in segments]
            return segments, staging.fetch(pairs)

        upcoming = fetch(0) if spans else None
        for i, tile in enumerate(self.store.tiles(index)):
            assert upcoming is not None
            segments, staged = upcoming
            upcoming = fetch(i + 1) if i + 1 < len(spans) else None
            staging.wait(staged)
            for (e, _, _, at), param, grad in zip(segments, staged.params, staged.grads):
                self._adam(e, param, grad, tile.tensors, at, clip)
            staging.put_back(staged)
        staging.finish()

    def _adam(self, e: Entry, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], at: int,
              clip: float | None) -> None:
        """One fused CPU Adam(W) call on a parameter slice and the matching slice of the state tile."""
        group = self.optimizer.param_groups[e.group]
        if clip is not None:
            grad = grad * clip
        n = param.numel()
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        kernel([param], [grad], [state["exp_avg"][at : at + n]], [state["exp_avg_sq"][at : at + n]], [],
               [self.steps[e.fqn]], lr=float(group["lr"]), beta1=beta1, beta2=beta2,
               weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)

    # -- overlap with backward --------------------------------------------------------------------------------
    def _hook_post_backward(self, index: int, unit: Unit) -> None:
        group = unit.fsdp_group
        post_backward: Callable[..., Any] = group.post_backward

        def post_backward_then_update(*args: Any, **kwargs: Any) -> Any:
            out = post_backward(*args, **kwargs)
            if group.reduce_grads and any(e.param.grad is not None for e in unit.entries):
                self._reduced(index, unit)
            return out

        group.post_backward = post_backward_then_update

    def _reduced(self, index: int, unit: Unit) -> None:
        if index in self._stepped_in_backward or index in self._sq_norms:
            raise RuntimeError(
                f"the gradients of {unit.name} were reduced twice before optimizer.step(): with "
                "offload.overlap_backward each block is updated as soon as its gradient is reduced, so accumulate "
                "micro-batches without gradient sync (engine.no_gradient_sync / Lightning's accumulate_grad_batches) "
                "or set offload.overlap_backward=false"
            )
        if unit.fsdp_group.device.type == "cuda":
            # FSDP2 writes the sharded gradients on its reduce-scatter / all-reduce stream, which the current
            # stream does not wait for until the end of backward: wait for that stream's last event of this group.
            if unit.fsdp_group._post_reduce_event is not None:
                unit.fsdp_group._post_reduce_event.synchronize()
            for fsdp_param in unit.fsdp_group.fsdp_params:
                if fsdp_param.grad_offload_event is not None:
                    fsdp_param.grad_offload_event.synchronize()
            torch.cuda.current_stream().synchronize()
        if self.max_grad_norm is not None:
            self._sq_norms[index] = self._unit_sq_norm(unit)
            return
        self._stepped_in_backward.add(index)
        # At most one update queued behind the running one: backward never runs far ahead of the updates,
        # so the blocks held for their update stay within the parameter swap buffers.
        while len(self._pending) > 1:
            self._pending.pop(0).result()
        assert self._worker is not None
        self._pending.append(self._worker.submit(self._update, unit, None, True))

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises an update's error (e.g. an I/O error naming the file) here

    # -- state dict (keyed by parameter name, like torch's get_optimizer_state_dict) ---------------------------
    def state_dict(self) -> dict[str, Any]:
        """Views of the stored moments (host memory, or a mapping of the NVMe files) as DTensors shaped like
        their parameters: torch.distributed.checkpoint saves them, or loads into them in place."""
        self._wait_pending()
        state: dict[str, Any] = {}
        for index, unit in enumerate(self.units):
            views = self.store.unit_views(index)
            for e in unit.entries:
                entry: dict[str, Any] = {"step": self.steps.setdefault(e.fqn, torch.zeros((), dtype=torch.float32))}
                for key in KEYS:
                    local = views[key][e.start : e.start + e.numel].view(_local(e.param).shape)
                    entry[key] = dtensor_like(e.param, local)
                state[e.fqn] = entry
        groups = []
        for i, group in enumerate(self.optimizer.param_groups):
            names = [e.fqn for u in self.units for e in u.entries if e.group == i]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        for fqn, saved in state_dict["state"].items():
            if fqn not in mine["state"]:
                raise KeyError(f"the checkpoint has optimizer state for {fqn!r}, which this model does not have")
            for key, value in saved.items():
                target = mine["state"][fqn][key]
                if _local(target).data_ptr() != _local(value).data_ptr():
                    _local(target).copy_(_local(value))
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})


def _segments(entries: list[Entry], start: int, numel: int) -> list[tuple[Entry, int, int, int]]:
    """(entry, lo, hi, at): the part [lo, hi) of each entry's elements inside the tile [start, start + numel),
    at offset ``at`` of the tile."""
    out = []
    for e in entries:
        lo, hi = max(e.start, start), min(e.start + e.numel, start + numel)
        if lo < hi:
            out.append((e, lo - e.start, hi - e.start, lo - start))
    return out


def _collective_device(units: list[Unit]) -> torch.device:
    """The device the data-parallel collectives run on: the parameters' mesh device (cuda even when the shards
    themselves are offloaded to the host), or a plain parameter's own device."""
    for unit in units:
        if unit.fsdp_group is not None:
            return unit.fsdp_group.device
        for e in unit.entries:
            if isinstance(e.param, DTensor):
                return torch.device(e.param.device_mesh.device_type)
            return e.param.device
    return torch.device("cpu")


def offload_state(optimizer: torch.optim.Optimizer) -> OffloadedAdam | None:
    return getattr(optimizer, "_memtrain_offload", None)

