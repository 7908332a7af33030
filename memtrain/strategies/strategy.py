"""``MemTrainStrategy``: the Lightning Trainer's door to the memtrain engine.

Lightning hooks only: the process group and mesh are set up in ``setup_environment``, the model is sharded
and the optimizers prepared in ``setup`` (a model built in ``__init__`` or in ``configure_model`` both work),
checkpoints are sharded DCP folders (written from the newest asynchronous snapshot when snapshots are on).
Everything else is the engine's.

The class is built once per Lightning namespace (``lightning.pytorch`` and ``pytorch_lightning`` have separate
base classes); ``strategy_class(namespace)`` returns it.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
import sys
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_info
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed.fsdp import register_fsdp_forward_method
from typing_extensions import override

from memtrain.checkpoint.sharded import load_sharded, save_sharded
from memtrain.checkpoint.state import (
    holds_all,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    state_is_held,
    template_optimizer_state,
)
from memtrain.config import ConfigError, MemTrainConfig
from memtrain.distributed import init_process_group, restartable_by_torchelastic
from memtrain.engine import Engine
from memtrain.local_update import local_update_of
from memtrain.sharding import build_mesh, check_launched_world
from memtrain.strategies.snapshot_callback import snapshot_callback_class


def _sharding_overrides(zero_stage: int | None, hybrid: bool | None, shard_size: int | None,
                        wrap: str | list[str] | None) -> dict[str, Any]:
    given = {"stage": zero_stage, "hybrid": hybrid, "shard_size": shard_size, "wrap": wrap}
    return {k: v for k, v in given.items() if v is not None}


# The registered NVMe strategy names take their folder from the environment when it is not given.
NVME_PATH_FROM_ENV = "$MEMTRAIN_NVME_PATH"


def _offload_overrides(offload_optimizer: str | None, offload_params: str | None, nvme_path: str | None,
                       host_memory_budget: int | str | None) -> dict[str, Any]:
    if nvme_path == NVME_PATH_FROM_ENV:
        nvme_path = os.environ.get(NVME_PATH_FROM_ENV[1:])
        if not nvme_path:
            raise ConfigError(
                "offload to NVMe needs a folder on the NVMe drive: export MEMTRAIN_NVME_PATH=/local_nvme, or pass "
                "MemTrainStrategy(zero_stage=3, offload_params='nvme', offload_optimizer='nvme', nvme_path=...)"
            )
    given = {"optimizer": offload_optimizer, "params": offload_params, "nvme_path": nvme_path,
             "host_memory_budget": host_memory_budget}
    return {k: v for k, v in given.items() if v is not None}


def _activations_overrides(activations: str | Mapping[str, Any] | None,
                           activation_memory_budget: int | str | None) -> dict[str, Any]:
    """``activations="swap"`` or ``{"policy": "swap", ...}``; a budget alone means the planner (policy auto)."""
    if activations is None:
        given: dict[str, Any] = {}
    elif isinstance(activations, str):
        given = {"policy": activations}
    elif isinstance(activations, Mapping):
        given = dict(activations)
    else:
        raise ConfigError(f"activations={activations!r} is not valid: use a policy name such as 'auto' or a mapping "
                          "of activations settings")
    if activation_memory_budget is not None:
        given["memory_budget"] = activation_memory_budget
        given.setdefault("policy", "auto")
    return given


def build_config(config: MemTrainConfig | Mapping[str, Any] | None, sharding: dict[str, Any],
                 offload: dict[str, Any] | None = None, local_update: Mapping[str, Any] | None = None,
                 activations: Mapping[str, Any] | None = None,
                 checkpoint: Mapping[str, Any] | None = None) -> MemTrainConfig:
    """Merge a config (object or mapping) with the strategy's keyword shortcuts; validated once, here."""
    data = config.to_dict() if isinstance(config, MemTrainConfig) else dict(config or {})
    for section, overrides in (("sharding", sharding), ("offload", offload), ("local_update", local_update),
                               ("activations", activations), ("checkpoint", checkpoint)):
        if overrides:
            data[section] = {**dict(data.get(section) or {}), **overrides}
    return MemTrainConfig.from_dict(data)


def check_precision(precision_plugin: Any) -> None:
    """Refuse fp16 loss scaling: a GradScaler checks each rank's gradient shard for overflow on its own, so
    ranks could disagree on skipping a step. (On CPU Lightning already turns 16-mixed into bf16-mixed.)"""
    if getattr(precision_plugin, "scaler", None) is not None:
        raise ConfigError(
            "precision='16-mixed' (loss scaling) is not supported by MemTrainStrategy: the scaler's overflow check "
            "is per gradient shard, so ranks could disagree on skipping a step. Use precision='bf16-mixed'."
        )


def materialize_device(offload_params: str, root_device: torch.device) -> torch.device:
    """Where the shards of a model built on meta are allocated: offloaded shards start in host memory (FSDP2's
    CPU offload refuses shards on the device; NVMe offload re-points host shards at the swap file)."""
    return torch.device("cpu") if offload_params != "none" else root_device


def materialize_sharded(module: torch.nn.Module, *, root_device: torch.device, offload_params: str,
                        allocate: Callable[[torch.nn.Module, torch.device], None]) -> None:
    """``allocate(module, device)`` (to_empty, then reset_parameters) a sharded model built on meta. Buffers are
    not offloaded: they go where the forward runs, where fully_shard puts the buffers of a model not on meta."""
    device = materialize_device(offload_params, root_device)
    allocate(module, device)
    if device != root_device:
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[name] = buf.to(root_device)


@functools.cache
def strategy_class(namespace: str) -> type:
    pl_strategies = importlib.import_module(f"{namespace}.strategies")
    launchers = importlib.import_module(f"{namespace}.strategies.launchers.subprocess_script")
    core_optimizer = importlib.import_module(f"{namespace}.core.optimizer")
    trainer_states = importlib.import_module(f"{namespace}.trainer.states")
    fabric = "lightning.fabric" if namespace.startswith("lightning") else "lightning_fabric"
    fabric_distributed = importlib.import_module(f"{fabric}.utilities.distributed")
    fabric_pg = importlib.import_module(f"{fabric}.plugins.collectives.torch_collective")
    fabric_seed = importlib.import_module(f"{fabric}.utilities.seed")
    fabric_optimizer = importlib.import_module(f"{fabric}.utilities.optimizer")
    fabric_init = importlib.import_module(f"{fabric}.utilities.init")
    rank_zero_only = importlib.import_module(f"{namespace}.utilities.rank_zero").rank_zero_only

    ParallelStrategy = pl_strategies.ParallelStrategy
    LightningOptimizer = core_optimizer.LightningOptimizer
    _pl_migrate_checkpoint = importlib.import_module(f"{namespace}.utilities.migration.utils")._pl_migrate_checkpoint
    TrainerFn = trainer_states.TrainerFn

    class MemTrainStrategy(ParallelStrategy):
        """Train a LightningModule with memtrain (ZeRO stages 0-3 or hybrid sharding on FSDP2).

        Args:
            config: a ``MemTrainConfig`` or its mapping form (``{"sharding": {"stage": 2}}``).
            zero_stage, hybrid, shard_size, wrap: shortcuts for the ``sharding`` section; they override
                ``config``.
            offload_optimizer, offload_params ("none" / "cpu" / "nvme"), nvme_path, host_memory_budget:
                shortcuts for the ``offload`` section (``memtrain.config.OffloadConfig``).
            local_update: the ``local_update`` section (CO2 / local SGD / DiLoCo, ``memtrain.config.LocalUpdateConfig``),
                e.g. ``{"tau": 12, "outer_momentum": 0.2, "staleness_penalty": True, "outer_clip": 1.0, "async": True}``.
                Local steps never communicate across replicas (each replica is its own FSDP2 group), the outer
                step runs inside ``optimizer_step`` after the optimizer's, and its metrics are logged there.
            activations: a policy name ("keep" / "recompute" / "swap" / "split" / "auto") or the ``activations``
                section as a mapping (``memtrain.config.ActivationsConfig``), e.g. ``{"policy": "swap", "tier":
                "cpu"}``. activation_memory_budget: bytes or '6GiB' for the planner (implies policy "auto").
            checkpoint: the ``checkpoint`` section (``memtrain.config.CheckpointConfig``), e.g.
                ``{"snapshot_every_n_steps": 1, "persist_every_n_snapshots": 50, "redundancy": "replica",
                "dirpath": "/ckpt"}``: asynchronous snapshots after optimizer steps, held by a keeper process per
                node; ``fit()`` resumes by itself from the newest one after a crash.
            process_group_backend: "nccl" / "gloo"; default by device type.
            timeout: process group timeout.
        """

        strategy_name = "memtrain"

        def __init__(
            self,
            config: MemTrainConfig | Mapping[str, Any] | None = None,
            *,
            zero_stage: int | None = None,
            hybrid: bool | None = None,
            shard_size: int | None = None,
            wrap: str | list[str] | None = None,
            offload_optimizer: str | None = None,
            offload_params: str | None = None,
            nvme_path: str | None = None,
            host_memory_budget: int | str | None = None,
            local_update: Mapping[str, Any] | None = None,
            activations: str | Mapping[str, Any] | None = None,
            activation_memory_budget: int | str | None = None,
            checkpoint: Mapping[str, Any] | None = None,
            accelerator: Any = None,
            parallel_devices: list[torch.device] | None = None,
            cluster_environment: Any = None,
            checkpoint_io: Any = None,
            precision_plugin: Any = None,
            process_group_backend: str | None = None,
            timeout: timedelta | None = fabric_pg.default_pg_timeout,
        ) -> None:
            super().__init__(
                accelerator=accelerator,
                parallel_devices=parallel_devices,
                cluster_environment=cluster_environment,
                checkpoint_io=checkpoint_io,
                precision_plugin=precision_plugin,
            )
            self.memtrain_config = build_config(
                config,
                _sharding_overrides(zero_stage, hybrid, shard_size, wrap),
                _offload_overrides(offload_optimizer, offload_params, nvme_path, host_memory_budget),
                local_update,
                _activations_overrides(activations, activation_memory_budget),
                checkpoint,
            )
            self._process_group_backend = process_group_backend
            self._timeout = timeout
            self._engine: Engine | None = None
            self.num_nodes = 1

        @property
        def engine(self) -> Engine:
            if self._engine is None:
                raise RuntimeError("the memtrain engine exists once the Trainer has set up the processes")
            return self._engine

        @property
        @override
        def root_device(self) -> torch.device:
            assert self.parallel_devices is not None
            return self.parallel_devices[self.local_rank]

        @property
        def num_processes(self) -> int:
            return len(self.parallel_devices) if self.parallel_devices is not None else 0

        @property
        def is_distributed(self) -> bool:
            # Lightning injects a DistributedSampler only for strategies that say so.
            return True

        @property
        @override
        def distributed_sampler_kwargs(self) -> dict[str, Any]:
            # Every rank is a data-parallel rank at every stage: each one reads its own samples.
            return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

        @property
        @override
        def restore_checkpoint_after_setup(self) -> bool:
            return True  # sharded state loads into the sharded model

        @property
        @override
        def lightning_restore_optimizer(self) -> bool:
            return False  # load_checkpoint restores the optimizers itself

        @override
        def _configure_launcher(self) -> None:
            assert self.cluster_environment is not None
            if not self.cluster_environment.creates_processes_externally:
                self._launcher = launchers._SubprocessScriptLauncher(
                    self.cluster_environment, self.num_processes, self.num_nodes
                )

        @override
        def setup_environment(self) -> None:
            # Every check that can fail does so before a process group starts.
            check_precision(self.precision_plugin)
            check_launched_world(self.num_processes, self.num_nodes, os.environ)
            world_size = self.num_nodes * self.num_processes
            plan = Engine.plan(self.memtrain_config, world_size, self.num_processes)
            super().setup_environment()
            fabric_seed.reset_seed()
            self._set_world_ranks()
            if self._process_group_backend is None:
                self._process_group_backend = fabric_distributed._get_default_process_group_backend_for_device(
                    self.root_device
                )
            if restartable_by_torchelastic() and not dist.is_initialized():  # each torchrun attempt: own prefix
                init_process_group(self._process_group_backend, timeout=self._timeout)
            else:
                fabric_distributed._init_dist_connection(
                    self.cluster_environment, self._process_group_backend, timeout=self._timeout
                )
            self._engine = Engine(self.memtrain_config, build_mesh(plan, self.root_device.type),
                                  ranks_per_node=self.num_processes)

        def _set_world_ranks(self) -> None:
            if self.cluster_environment is not None:
                self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
                self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
            rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

        @override
        def setup(self, trainer: Any) -> None:
            assert self.model is not None and self.accelerator is not None
            self.accelerator.setup(trainer)
            self.model = self.precision_plugin.convert_module(self.model)
            # Shard first: FSDP2 moves each rank's shards to the device, so a model larger than one device can
            # be built on the host; model_to_device then moves what sharding does not manage. A model built
            # with empty_init (on meta) is allocated whole before sharding at the replicated stages (which then
            # broadcast rank 0's weights), and only as each rank's shards after sharding at stages 2-3.
            on_meta = any(p.is_meta for p in self.model.parameters())
            replicated = self.memtrain_config.sharding.stage < 2
            if on_meta and replicated:
                fabric_init._materialize_distributed_module(self.model, self.root_device)
            materialize = None
            if on_meta and not replicated:
                # After sharding, before parameter offload moves the shards to NVMe.
                materialize = functools.partial(materialize_sharded, root_device=self.root_device,
                                                offload_params=self.memtrain_config.offload.params,
                                                allocate=fabric_init._materialize_distributed_module)
            self.engine.prepare_model(self.model, materialize=materialize)
            if self.memtrain_config.offload.params == "none":  # offloaded shards stay where offload put them
                self.model_to_device()
            # Lightning calls the *_step methods, not forward: the root's gather / reshard hooks must run there.
            for method in ("training_step", "validation_step", "test_step", "predict_step"):
                register_fsdp_forward_method(self.model, method)
            self.barrier()
            if trainer.state.fn == TrainerFn.FITTING:
                self.setup_optimizers(trainer)
                max_grad_norm = self._offloaded_clip(trainer)
                self.optimizers = [self.engine.prepare_optimizer(o, self.model, max_grad_norm) for o in self.optimizers]
                fabric_optimizer._optimizers_to_device(self.optimizers, self.root_device)
            self.setup_precision_plugin()
            if self._engine is not None and self._engine.checkpoints is not None:
                self._setup_snapshots(trainer)
            stage = self.memtrain_config.sharding
            rank_zero_info(
                f"memtrain: ZeRO stage {stage.stage}{' hybrid' if stage.hybrid else ''} on mesh "
                f"{tuple(self.engine.mesh.shape)} {self.engine.mesh.mesh_dim_names}"
            )

        def _setup_snapshots(self, trainer: Any) -> None:
            """Snapshot after every n-th optimizer step (a callback that runs before ModelCheckpoint), and let
            ``fit()`` resume by itself from the newest snapshot the keepers or peers hold (or, when no
            ``ckpt_path`` is given, from the newest durable checkpoint in ``checkpoint.dirpath``)."""
            trainer.callbacks.insert(0, snapshot_callback_class(namespace)(self))
            connector = trainer._checkpoint_connector
            resume_start = connector.resume_start

            def resume_from_snapshot_first(checkpoint_path: Any = None, weights_only: bool | None = None) -> None:
                manager = self.engine.checkpoints
                assert manager is not None and self.model is not None
                if trainer.state.fn == TrainerFn.FITTING:
                    optimizers = self._raw_optimizers()
                    fresh = [not o.state for o in optimizers]
                    late = [f"optimizer_{i}" for i, o in enumerate(optimizers) if state_is_held(o)]
                    restored = manager.restore(self._checkpoint_template, use_durable=checkpoint_path is None,
                                               late=late)  # arrives while the first forward runs
                    if restored is not None:
                        self._load_into_live(restored.state, restored.rank_state)
                        if restored.late and not holds_all(optimizers, restored.late):
                            manager.wait_copied()  # the load copied the state elsewhere: load it again, whole
                            self._load_into_live(restored.state, restored.rank_state)
                        connector._ckpt_path = restored.path or f"memtrain snapshot of step {restored.step}"
                        connector._loaded_checkpoint = _pl_migrate_checkpoint(dict(restored.meta), None)
                        return
                    for optimizer, was_fresh in zip(optimizers, fresh):
                        if was_fresh:  # the template allocated optimizer state: the first step must start from none
                            optimizer.state.clear()
                resume_start(checkpoint_path, weights_only)

            connector.resume_start = resume_from_snapshot_first

        def _raw_optimizers(self) -> list[torch.optim.Optimizer]:
            return [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]

        def split_checkpoint(self, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                       dict[str, Any] | None]:
            """Lightning's checkpoint dict -> (sharded tensors, job-wide values, this rank's own values)."""
            checkpoint = dict(checkpoint)
            tensors = {"model": checkpoint.pop("state_dict")}
            for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
                tensors[f"optimizer_{i}"] = state
            checkpoint["world_size"] = self.world_size
            checkpoint["memtrain_config"] = self.memtrain_config.to_dict()
            # Local updates: replicas differ, so each rank also keeps its replica's own state (memtrain.local_update).
            local_updates = self._local_updates()
            rank_state = {"local_update": [lu.state_dict() for lu in local_updates]} if local_updates else None
            return tensors, checkpoint, rank_state

        def _checkpoint_template(self) -> dict[str, Any]:
            """The live state in the checkpoint's layout, for a checkpoint or snapshot to be read into."""
            assert self.model is not None
            tensors: dict[str, Any] = {"model": model_state(self.model)}
            for i, optimizer in enumerate(self._raw_optimizers()):
                tensors[f"optimizer_{i}"] = template_optimizer_state(self.model, optimizer)
            return tensors

        def _load_into_live(self, tensors: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
            assert self.model is not None
            load_model_state(self.model, tensors["model"])
            for i, optimizer in enumerate(self._raw_optimizers()):
                load_optimizer_state(self.model, optimizer, tensors[f"optimizer_{i}"])
            saved = (rank_state or {}).get("local_update")
            for i, local_update in enumerate(self._local_updates()):
                if saved is not None and i < len(saved):
                    local_update.load_state_dict(saved[i])
                else:  # another world size, or saved without local updates
                    local_update.reset_from_model()

        def _offloaded_clip(self, trainer: Any) -> float | None:
            """An offloaded optimizer that updates blocks during backward clips by itself (Lightning would clip
            after backward, too late): hand it the Trainer's threshold and make Lightning's clipping a no-op."""
            offload = self.memtrain_config.offload
            if not (offload.enabled and offload.overlap_backward) or not trainer.gradient_clip_val:
                return None
            if trainer.gradient_clip_algorithm != "norm":
                raise ConfigError(
                    f"gradient_clip_algorithm={trainer.gradient_clip_algorithm!r} with offload.overlap_backward: "
                    "the offloaded optimizer clips by the global norm only; use 'norm' or overlap_backward=false"
                )
            self.precision_plugin.clip_gradients = lambda *args, **kwargs: None  # done inside the step
            return float(trainer.gradient_clip_val)

        @override
        def setup_optimizers(self, trainer: Any) -> None:
            self._reset_optimizers_and_schedulers()
            super().setup_optimizers(trainer)

        @contextmanager
        @override
        def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
            # configure_model builds on the host (or on meta with empty_init), not on the device: sharding then
            # moves only each rank's shards there, so a model larger than one device can be built.
            device = torch.device("meta") if empty_init else torch.device("cpu")
            with device, self.precision_plugin.tensor_init_context():
                yield

        @override
        def model_to_device(self) -> None:
            assert self.model is not None
            self.model.to(self.root_device)

        @contextmanager
        @override
        def block_backward_sync(self) -> Generator[None, None, None]:
            """Gradient accumulation: no gradient communication until the last micro-batch. (With local updates
            there is none across replicas at all: the model's mesh is the shard dimension only.)"""
            assert self.model is not None
            with self.engine.no_gradient_sync(self.model):
                yield

        @override
        def barrier(self, name: str | None = None) -> None:
            if not fabric_distributed._distributed_is_initialized():
                return
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

        @override
        def broadcast(self, obj: Any, src: int = 0) -> Any:
            if not fabric_distributed._distributed_is_initialized():
                return obj
            box = [obj]
            dist.broadcast_object_list(box, src)
            return box[0]

        @override
        def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor:
            if isinstance(tensor, Tensor):
                return fabric_distributed._sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
            return tensor

        @override
        def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
            out = super().optimizer_step(optimizer, closure, model, **kwargs)  # local updates: the outer step ran
            local_update = local_update_of(optimizer)
            if local_update is not None and self.lightning_module is not None:
                self.lightning_module.log_dict(local_update.metrics(), on_step=True, on_epoch=False)
            return out

        def _local_updates(self) -> list[Any]:
            return [lu for lu in map(local_update_of, self.optimizers) if lu is not None]

        @override
        def teardown(self) -> None:
            if self._engine is not None and self._engine.checkpoints is not None:
                # A clean end lets the keeper go of this job's snapshots; after an error they stay for a restart.
                self._engine.checkpoints.close(finished=sys.exc_info()[0] is None)
                self._engine.checkpoints = None
            for local_update in self._local_updates():
                local_update.close()
            assert self.cluster_environment is not None and self.accelerator is not None
            if self._engine is not None:
                self._engine.offload.close()  # this run's swap folder goes; offloaded shards stay readable
                if self._engine.activations is not None:
                    self._engine.activations.close()
            self.checkpoint_io.teardown()
            self.cluster_environment.teardown()
            self.precision_plugin.teardown()
            self.accelerator.teardown()

        # -- checkpoints: one sharded folder, see memtrain.checkpoint.sharded ---------------------------------
        @override
        def lightning_module_state_dict(self) -> dict[str, Any]:
            assert self.model is not None
            return model_state(self.model)

        @override
        def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
            pass  # load_checkpoint already read the shards into the model

        @override
        def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
            assert self.model is not None
            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            return optimizer_state(self.model, optimizer)

        @override
        def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
            pass  # load_checkpoint already read the shards into the optimizers

        @override
        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError(
                    "MemTrainStrategy.save_checkpoint(..., storage_options=...) is not supported: checkpoints are "
                    "sharded torch.distributed.checkpoint folders written by every rank"
                )
            path = Path(self.broadcast(str(filepath)))
            if self.is_global_zero and path.is_file():
                path.unlink()  # a plain file of the same name from another strategy
            tensors, meta, rank_state = self.split_checkpoint(checkpoint)
            manager = self._engine.checkpoints if self._engine is not None else None
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            if manager is not None and trainer is not None and manager.latest_step == trainer.global_step:
                # The snapshot of this very state is in host memory: written from there in the background.
                manager.persist(path, meta=meta)
                return
            save_sharded(path, tensors, meta=meta, rank_state=rank_state)

        @override
        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            assert self.model is not None
            path = Path(self.broadcast(str(checkpoint_path)))
            if path.is_file():
                raise ValueError(
                    f"{path} is a single-file checkpoint; MemTrainStrategy resumes from its own sharded checkpoint "
                    "folders. To start from plain weights, load them into the model before calling fit()."
                )
            tensors = self._checkpoint_template()
            meta, rank_state = load_sharded(path, tensors)
            self._load_into_live(tensors, rank_state)
            if meta.get("world_size", self.world_size) != self.world_size:
                rank_zero_info(f"memtrain: resharded checkpoint from {meta['world_size']} to {self.world_size} ranks")
            return meta

        @override
        def remove_checkpoint(self, filepath: Any) -> None:
            if self._engine is not None and self._engine.checkpoints is not None:
                self._engine.checkpoints.wait_flushes()  # never remove a folder a queued write would recreate
            if self.is_global_zero:
                path = Path(filepath)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

        @classmethod
        @override
        def register_strategies(cls, strategy_registry: Any) -> None:
            pass  # memtrain.strategies.register_strategies registers the names, with their settings

    MemTrainStrategy.__module__ = __name__
    return MemTrainStrategy


__all__ = ["ConfigError", "build_config", "check_precision", "strategy_class"]
