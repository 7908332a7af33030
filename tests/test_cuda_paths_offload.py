"""The CUDA-only paths of offload and snapshots, checked on the CPU.

A DeviceMesh of device type "cuda" is built without a process group (nothing runs on it): DTensors over host
state on it are what a GPU run makes. ``DTensor.from_local`` would move their local tensors to the GPU (on
this CPU build it raises instead), so these tests fail wherever a view of host state becomes a copy.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from memtrain.checkpoint.layout import flatten
from memtrain.offload.optimizer import KEYS, Entry, OffloadedAdam, Unit, _collective_device
from memtrain.offload.store import StateStore
from memtrain.offload.views import dtensor_like, dtensor_view

GLOBAL, LOCAL = (5, 2), (3, 2)  # rank 0's rows of an uneven Shard(0) over 2 ranks


def cuda_mesh() -> DeviceMesh:
    return DeviceMesh("cuda", [0, 1], _init_backend=False, _rank=0)


def host_shard(local: torch.Tensor) -> DTensor:
    """Rank 0's part of a (5, 2) DTensor on the CUDA mesh whose local tensor is ``local`` (on the host)."""
    return dtensor_view(local, cuda_mesh(), [Shard(0)], GLOBAL, (2, 1))


def test_dtensor_view_keeps_the_local_tensor_where_it_is() -> None:
    local = torch.arange(6.0).view(LOCAL)
    view = host_shard(local)
    assert view._local_tensor is local and view.device.type == "cpu"
    assert view.shape == GLOBAL and view.stride() == (2, 1) and view.placements == (Shard(0),)
    assert view.device_mesh.device_type == "cuda" and not view.requires_grad
    like = dtensor_like(view, torch.zeros(LOCAL))
    assert like.shape == GLOBAL and like.placements == (Shard(0),) and like._local_tensor.device.type == "cpu"
    plain = torch.zeros(3)
    assert dtensor_like(plain, plain) is plain


def test_snapshot_entries_rebuild_over_the_snapshot_bytes() -> None:
    """The flush thread's DTensors view the snapshot buffer (not a copy on the GPU)."""
    _, _, layout = flatten({"model": {"w": host_shard(torch.randn(LOCAL))}})
    flat = torch.zeros(layout.data_bytes, dtype=torch.uint8)
    local = layout.views(flat)[0]
    rebuilt = layout.entries[0].rebuild(local)
    assert isinstance(rebuilt, DTensor) and rebuilt._local_tensor.data_ptr() == flat.data_ptr()
    assert rebuilt.shape == GLOBAL and rebuilt.placements == (Shard(0),) and rebuilt.stride() == (2, 1)


def test_offloaded_moments_save_and_load_through_the_store() -> None:
    param = nn.Parameter(torch.zeros(LOCAL), requires_grad=False)
    shard = host_shard(param.data)
    optimizer = torch.optim.AdamW([param])
    store = StateStore(KEYS, [6], 1.0, 4096)
    adam = OffloadedAdam(optimizer, [Unit("u", [Entry("w", shard, 0, 0, 6)])], store, None, False, None)
    state = adam.state_dict()["state"]["w"]
    held = store.unit_views(0)
    for key in KEYS:
        assert state[key].shape == GLOBAL and state[key].placements == (Shard(0),)
        assert state[key]._local_tensor.data_ptr() == held[key].data_ptr()
    saved = {k: host_shard(torch.full(LOCAL, float(i + 1))) for i, k in enumerate(KEYS)}
    adam.load_state_dict({"state": {"w": {"step": torch.tensor(3.0), **saved}},
                          "param_groups": [{"lr": 0.5}]})
    for i, key in enumerate(KEYS):
        assert torch.equal(store.unit_views(0)[key], torch.full((6,), float(i + 1)))
    assert adam.steps["w"].item() == 3.0 and optimizer.param_groups[0]["lr"] == 0.5


def test_nvme_parameter_views_are_the_swap_file(tmp_path: Path) -> None:
    from memtrain.offload.params import ParamOffload
    from memtrain.swap import SwapEngine

    data = torch.arange(6.0)
    shard = host_shard(data.view(LOCAL))
    fsdp_param = SimpleNamespace(_sharded_param_data=data, sharded_param=shard)
    group = SimpleNamespace(fsdp_params=[fsdp_param], unshard=None, wait_for_unshard=None)
    offload = ParamOffload([("block", group)], tmp_path, SwapEngine(), prefetch=0, keep_for_update=False,
                           pin=False)
    model = SimpleNamespace(named_parameters=lambda: [("w", shard)])
    view = offload.state_views(model)["w"]  # type: ignore[arg-type]
    mapped, _ = offload.mapped_files()[0]
    assert view._local_tensor.data_ptr() == mapped.data_ptr()
    assert view.shape == GLOBAL and view.placements == (Shard(0),)
    assert torch.equal(view._local_tensor, torch.arange(6.0).view(LOCAL))
    view._local_tensor.fill_(7.0)  # what a checkpoint load writes reaches the file
    assert torch.equal(mapped[: data.nbytes].view(torch.float32), torch.full((6,), 7.0))


class FakeEvent:
    def __init__(self, on_sync: Any) -> None:
        self.on_sync = on_sync
        self.synced = False

    def synchronize(self) -> None:
        self.synced = True
        self.on_sync()


def test_overlapped_update_waits_for_the_reduce_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gradients FSDP2 writes on its reduce stream are final only once its post-reduce event is done; the
    optimizer thread runs on the training GPU."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(synchronize=lambda: None))
    param = nn.Parameter(torch.zeros(4))
    final = torch.tensor([3.0, 4.0, 0.0, 0.0])
    group = SimpleNamespace(device=torch.device("cuda", 1), fsdp_params=[SimpleNamespace(grad_offload_event=None)],
                            reduce_grads=True, _post_reduce_event=None)

    def post_backward() -> None:  # the reduce is queued: the gradient is written when the stream gets there
        param.grad = torch.zeros(4)
        group._post_reduce_event = FakeEvent(lambda: param.grad.copy_(final))

    group.post_backward = post_backward
    adam = OffloadedAdam(torch.optim.AdamW([param]), [Unit("u", [Entry("w", param, 0, 0, 4)], group)],
                         StateStore(KEYS, [4], 1.0, 4096), None, True, None, max_grad_norm=1.0)
    try:
        assert adam._worker is not None
        assert adam._worker._initializer is torch.cuda.set_device  # type: ignore[attr-defined]
        assert adam._worker._initargs == (torch.device("cuda", 1),)  # type: ignore[attr-defined]
        group.post_backward()
        assert group._post_reduce_event.synced
        assert adam._sq_norms[0].item() == pytest.approx(25.0)
    finally:
        adam._worker.shutdown()


def test_gradient_norm_is_reduced_on_the_mesh_device() -> None:
    """The data-parallel group may be NCCL only: the norm goes through the mesh's device, even when the shards
    (and so their gradients) are on the host."""
    offloaded = Unit("u", [Entry("w", host_shard(torch.zeros(LOCAL)), 0, 0, 6)])
    assert _collective_device([offloaded]).type == "cuda"
    fsdp = Unit("u", [Entry("w", torch.zeros(1), 0, 0, 1)], SimpleNamespace(device=torch.device("cuda", 3)))
    assert _collective_device([fsdp]) == torch.device("cuda", 3)
    assert _collective_device([Unit("u", [Entry("w", torch.zeros(1), 0, 0, 1)])]).type == "cpu"


def test_offloaded_shards_are_materialized_on_the_host() -> None:
    from memtrain.strategies.strategy import materialize_device, materialize_sharded

    gpu = torch.device("cuda", 1)
    assert materialize_device("none", gpu) == gpu
    assert materialize_device("cpu", gpu) == materialize_device("nvme", gpu) == torch.device("cpu")
    with torch.device("meta"):
        model = nn.BatchNorm1d(4)
    allocated_on = []

    def allocate(module: nn.Module, device: torch.device) -> None:
        allocated_on.append(device)
        module.to_empty(device=device)

    # "meta" stands in for the GPU the forward runs on: buffers go there, the offloaded parameters do not.
    materialize_sharded(model, root_device=torch.device("meta"), offload_params="nvme", allocate=allocate)
    assert allocated_on == [torch.device("cpu")]
    assert model.weight.device.type == "cpu" and model.running_mean.device.type == "meta"
