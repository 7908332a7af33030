"""Run the Lightning Trainer with MemTrainStrategy on gloo processes, launched externally as torchrun would."""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from memtrain.strategies import MemTrainStrategy
from tests.parity import full_params, global_batch, make_optimizer, tiny_gpt


def step_dataset(steps: int, global_batch_size: int) -> TensorDataset:
    """Sample i of step s sits at s * global_batch_size + i: a DistributedSampler without shuffling then gives
    every step the same set of samples as the reference's global batch for that step."""
    xs, ys = zip(*(global_batch(s, global_batch_size) for s in range(steps)))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class TinyModule(L.LightningModule):
    def __init__(self, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.model = None if build_in_configure_model else tiny_gpt()
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self)


def launched_env(rank: int, world: int) -> dict[str, str]:
    """What torch's launchers export; Lightning then treats the processes as created externally."""
    return {"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world), "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def fit(rank: int, world: int, *, strategy: dict[str, Any], steps: int, global_batch_size: int, epochs: int = -1,
        accumulate: int = 1, trainer: dict[str, Any] | None = None, build_in_configure_model: bool = False,
        data_steps: int | None = None, ckpt_path: str | None = None, callbacks: list[Any] | None = None,
        module: TinyModule | None = None) -> dict[str, Any]:
    os.environ.update(launched_env(rank, world))
    module = module or TinyModule(build_in_configure_model)
    data = step_dataset(data_steps or steps, global_batch_size)
    # Lightning's own sampler always shuffles training data; an explicit unshuffled one keeps the reference's order.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=global_batch_size // (world * accumulate), sampler=sampler)
    t = L.Trainer(
        accelerator="cpu", devices=world, strategy=MemTrainStrategy(**strategy), max_steps=steps, max_epochs=epochs,
        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=bool(callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=callbacks, **(trainer or {}),
    )
    t.fit(module, loader, ckpt_path=ckpt_path)
    losses = torch.tensor(module.losses, dtype=torch.float64)
    dist.all_reduce(losses)
    # Lightning logs per micro-batch; group them into optimizer steps to compare with the reference.
    per_step = (losses / world).view(-1, accumulate).mean(dim=1).tolist()
    return {"losses": per_step, "params": full_params(module.model), "global_step": t.global_step}
