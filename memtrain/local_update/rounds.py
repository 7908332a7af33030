"""``LocalUpdate``: runs the outer loop around the user's optimizer (installed by wrapping ``optimizer.step``).

Per replica (flat vectors, see ``flat.py``):  x  live local parameters;  B  where this round's local progress
is measured from;  A, m  the anchor and outer momentum of ``outer.py`` (identical on every replica).

Every ``tau`` optimizer steps (a boundary):
  g = B - x                               this round's pseudo-gradient, a snapshot: a new buffer
  synchronous:  A = outer(mean g);  x = A                         (local SGD, SlowMo, DiLoCo)
  asynchronous: A = outer(mean g of the previous round, which has been reducing in the background during
                this round's tau steps);  start reducing this g;  x = A - g
  B = x
In asynchronous mode each replica thus keeps its own newest round of progress (-g) on top of the anchor
until its average arrives one round later: progress made during the overlap is never overwritten, and every
round's progress enters the anchor exactly once. The first asynchronous boundary has nothing to apply yet.

With ``outer_state_sharding`` each replica holds only its slice of A and m (``sharded.py``): the round becomes
reduce-scatter, outer step on the slice, all-gather, all of it where the all-reduce ran (on the background
thread in asynchronous mode), and its result is the new anchor A itself, applied at the next boundary as above.
The full anchor is gathered on the training thread only when no round is pending (the first boundary, after
``synchronize``), before any launch, so two threads never run collectives on the replica group at once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from memtrain.config import LocalUpdateConfig
from memtrain.local_update.compress import ReplicaMean
from memtrain.local_update.flat import FlatParams, local_tensor
from memtrain.local_update.outer import OuterOptimizer
from memtrain.local_update.overlap import BackgroundReduce
from memtrain.local_update.sharded import ShardedOuter


class LocalUpdate:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: LocalUpdateConfig,
                 group: dist.ProcessGroup, shard_group: dist.ProcessGroup | None = None,
                 stats_group: dist.ProcessGroup | None = None) -> None:
        """``stats_group``: every rank of the mesh; needed only for the staleness penalty with the outer state
        sharded on a mesh with shard groups (its per-tensor rms spans replicas and shards)."""
        assert config.tau is not None
        self.config, self.optimizer, self.group = config, optimizer, group
        self.flat = FlatParams(model)
        self.replicas = dist.get_world_size(group)
        self.shard_group = shard_group if shard_group is not None and dist.get_world_size(shard_group) > 1 else None
        self._broadcast_from_first_replica(model)
        outer_device = torch.device("cpu") if config.outer_state_device == "cpu" else self.flat.device
        x = self.flat.read()
        self.base = x
        self.mean = ReplicaMean(group, config.compression, config.compression_block)
        self.sharded: ShardedOuter | None = None
        anchor, segments, sums = x, self.flat.segments, self._sum_over_shards
        if config.outer_state_sharding:
            if stats_group is None and self.shard_group is not None and config.staleness_penalty:
                raise ValueError("the staleness penalty of a sharded outer state on a mesh with shard groups needs "
                                 "stats_group (every rank of the mesh)")
            self.sharded = ShardedOuter(self.mean, self.flat.numel, stats_group or group, self.flat.device)
            anchor, segments, sums = self.sharded.own(x), self.sharded.segments(segments), self.sharded.sum_over_owners
        self.outer = OuterOptimizer(
            anchor.to(outer_device, copy=True), segments, optimizer=config.outer_optimizer, lr=config.outer_lr,
            momentum=config.outer_momentum, clip=config.outer_clip, staleness_penalty=config.staleness_penalty,
            tensor_numels=self.flat.tensor_numels, sum_over_shards=sums)
        self._round = self._sharded_round if self.sharded is not None else self.mean
        self.background = BackgroundReduce(self._round, self.flat.device) if config.asynchronous else None
        self._ready: torch.Tensor | None = None  # a finished reduction not applied yet (after a checkpoint)
        self.local_steps = 0
        self._inner_step = optimizer.step
        optimizer.step = self.step  # type: ignore[method-assign]
        optimizer._memtrain_local_update = self  # type: ignore[attr-defined]

    @torch.no_grad()
    def _broadcast_from_first_replica(self, model: nn.Module) -> None:
        """Replicas start equal (each shard group may have been built from a different seed)."""
        src = dist.get_global_rank(self.group, 0)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(local_tensor(t.data), src=src, group=self.group)

    def _sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums over this replica's shard group (whole-tensor statistics at stages 2-3)."""
        if self.shard_group is None:
            return t
        on_device = t.to(self.flat.device)
        dist.all_reduce(on_device, group=self.shard_group)
        return on_device.to(t.device)

    # -- stepping --------------------------------------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._inner_step(*args, **kwargs)
        self.local_steps += 1
        if self.local_steps % self.config.tau == 0:
            self.boundary()
        return out

    @property
    def outer_steps(self) -> int:
        return self.outer.steps

    @property
    def in_flight(self) -> bool:
        return self._ready is not None or (self.background is not None and self.background.in_flight)

    def _apply_to_anchor(self, result: torch.Tensor) -> torch.Tensor:
        """The anchor after the finished round ``result`` (the mean pseudo-gradient, or with a sharded outer state
        the new anchor its round already computed)."""
        if self.sharded is not None:
            self.outer.steps += 1  # counted when applied, as unsharded: outer_steps never races the thread
            return result
        return self.outer.step(result).to(self.flat.device)

    @torch.no_grad()
    def _sharded_round(self, g: torch.Tensor) -> torch.Tensor:
        """Reduce-scatter, outer step on the owned slice, all-gather: the new full anchor (``g`` is only read)."""
        assert self.sharded is not None
        self.outer.update(self.sharded.mean_of_owned(g))
        return self.sharded.gather(self.outer.anchor, self.flat.device)

    def _current_anchor(self) -> torch.Tensor:
        """The full anchor on the parameters' device (sharded: an all-gather, so never while a round runs)."""
        if self.sharded is not None:
            return self.sharded.gather(self.outer.anchor, self.flat.device)
        return self.outer.anchor.to(self.flat.device)

    def _set_anchor(self, full: torch.Tensor) -> None:
        self.outer.anchor.copy_(self.sharded.own(full) if self.sharded is not None else full)

    @property
    def outer_state_bytes(self) -> int:
        """Bytes of outer state (anchor, momentum, previous outer step) this rank holds."""
        return self.outer.state_bytes

    @torch.no_grad()
    def boundary(self) -> None:
        x = self.flat.read()
        g = self.base.sub(x)  # the snapshot: later local steps write x, never g
        if self.background is None:
            x = self._apply_to_anchor(self._round(g)).clone()
        else:
            previous = self._take_finished()
            anchor = self._current_anchor() if previous is None else None  # may gather: before the launch
            self.background.launch(g)  # reduces while the outer step below and the next tau steps run
            x = (anchor if anchor is not None else self._apply_to_anchor(previous)).sub(g)
        self.flat.write(x)
        # Parameters stored in a lower precision round on write: measure the next round from what they hold.
        self.base = x if self.flat.all_fp32 else self.flat.read()

    def _take_finished(self) -> torch.Tensor | None:
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        if self.background is not None and self.background.in_flight:
            return self.background.wait()
        return None

    @torch.no_grad()
    def synchronize(self) -> None:
        """Make every replica equal now (end of training, evaluation): apply the round in flight, then average
        the progress not yet averaged. The outer loop continues from there."""
        previous = self._take_finished()
        anchor = self._apply_to_anchor(previous) if previous is not None else self._current_anchor()
        x = anchor.sub(self.mean(self.base.sub(self.flat.read())))
        self._set_anchor(x)
        self.flat.write(x)
        self.base = x if self.flat.all_fp32 else self.flat.read()

    def metrics(self) -> dict[str, float]:
        """Outer steps so far and, for the newest finished asynchronous round, its all-reduce time and how
        much of it ran hidden behind local steps."""
        out = {"local_update/outer_steps": float(self.outer_steps)}
        if self.background is not None and self.background.history:
            last = self.background.history[-1]
            out.update({"local_update/allreduce_s": last.reduce_seconds, "local_update/hidden_s": last.hidden_seconds,
                        "local_update/wait_s": last.waited})
        return out

    def close(self) -> None:
        """Finish the round in flight (kept for ``synchronize`` / a checkpoint) and stop the background thread.
        Call it before destroying the process group: a collective still running on the thread would abort the
        process. No boundary may follow."""
        if self.background is not None:
            if self.background.in_flight:
                self._ready = self.background.wait()
            self.background.close()

    # -- checkpoint: per-rank state (replicas differ, so DCP's de-duplicated model/optimizer are not enough) --
    def state_dict(self) -> dict[str, Any]:
        """Waits for the round in flight (its result is saved and applied at the next boundary, as it would
        have been), so a resumed run is bitwise equal to an uninterrupted one."""
        if self.background is not None and self.background.in_flight:
            self._ready = self.background.wait()
        cpu = lambda t: None if t is None else t.detach().to("cpu", copy=True)  # noqa: E731
        return {
            "local_steps": self.local_steps,
            "config": self._saved_config(),
            "base": cpu(self.base),
            "ready": cpu(self._ready),
            "outer": {k: cpu(v) if isinstance(v, torch.Tensor) else v for k, v in self.outer.state_dict().items()},
            "params": cpu(self.flat.read()),
            "optimizer": [cpu(t) if isinstance(t, torch.Tensor) else t for t in _optimizer_values(self.optimizer)],
        }

    def _saved_config(self) -> dict[str, Any]:
        """What must match on resume; the sharding key only when on, so unsharded checkpoints keep their form."""
        saved: dict[str, Any] = {"tau": self.config.tau, "asynchronous": self.config.asynchronous}
        if self.sharded is not None:  # each rank saves its own slice: the same replica count must load it
            saved["outer_state_sharding"] = self.replicas
        return saved

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        if saved != self._saved_config():
            raise ValueError(f"checkpoint was written with local_update {saved}, this run has {self._saved_config()}: "
                             "resume with the same tau, mode and outer state sharding (replica count)")
        if state["params"].numel() != self.flat.numel:
            raise ValueError("checkpointed local-update state does not match this model's parameters")
        if self.background is not None and self.background.in_flight:
            self.background.wait()
        self.local_steps = int(state["local_steps"])
        self.flat.write(state["params"].to(self.flat.device))
        self.base = state["base"].to(self.flat.device)
        self._ready = None if state["ready"] is None else state["ready"].to(self.flat.device)
        self.outer.load_state_dict(state["outer"])
        values = _optimizer_values(self.optimizer)
        if len(values) != len(state["optimizer"]):
            raise ValueError("checkpointed optimizer state of this replica does not match the optimizer")
        for mine, saved_value in zip(values, state["optimizer"]):
            if isinstance(mine, torch.Tensor):
                mine.copy_(saved_value)

    @torch.no_grad()
    def reset_from_model(self) -> None:
        """Start the outer loop afresh from the current parameters (a checkpoint without per-replica state)."""
        if self.background is not None and self.background.in_flight:
            self.background.wait()
        self._ready = None
        self._broadcast_from_first_replica_params()
        self.base = self.flat.read()
        self._set_anchor(self.base)

    def _broadcast_from_first_replica_params(self) -> None:
        src = dist.get_global_rank(self.group, 0)
        for t in self.flat.locals:
            dist.broadcast(t, src=src, group=self.group)


def _optimizer_values(optimizer: torch.optim.Optimizer) -> list[Any]:
    """This rank's optimizer state values in a fixed order (tensors as this rank's local pieces)."""
    values: list[Any] = []
    for state in optimizer.state.values():
        for key in sorted(state):
            v = state[key]
            values.append(local_tensor(v) if isinstance(v, torch.Tensor) else v)
    return values


def local_update_of(optimizer: torch.optim.Optimizer) -> LocalUpdate | None:
    inner = getattr(optimizer, "_optimizer", optimizer)  # Lightning's LightningOptimizer wraps the optimizer
    return getattr(inner, "_memtrain_local_update", None)
