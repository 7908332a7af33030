"""The LightningModule of the default job: the reference GPT, AdamW, linear warmup then cosine decay."""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch

from memtrain.models import GPT, GPTConfig


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class GPTModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 20,
        max_steps: int = 1000,
        build_in_configure_model: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = GPTConfig(**(model or {}))
        self.model: GPT | None = None if build_in_configure_model else GPT(self.model_config)
        self.loss_history: list[float] = []  # this rank's training loss per batch

    def configure_model(self) -> None:
        if self.model is None:  # built here, under the strategy's init context, when asked to
            self.model = GPT(self.model_config)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        self.loss_history.append(loss.item())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.95),
            foreach=True,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, hp.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
