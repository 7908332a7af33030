"""``memtrain-train``: the Hydra app. Trains the reference GPT with the Lightning Trainer and MemTrainStrategy.

    memtrain-train                                   # ZeRO-3, every local device (2 CPU processes without GPUs)
    memtrain-train strategy=zero2 model=gpt_small trainer.max_steps=50
    torchrun --standalone --nproc_per_node 2 -m memtrain.cli.train -m launcher=torchrun sharding.stage=2,3
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from memtrain.cli.gpt_module import GPTModule
from memtrain.config import MemTrainConfig
from memtrain.data import ByteCorpus, build_stdlib_corpus
from memtrain.distributed import exit_worker
from memtrain.sharding import detect_launched_world
from memtrain.strategies import MemTrainStrategy, MemTrainTelemetry

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run_id() -> str:
    """One folder name per job, the same on every rank: the launcher's id, else the start time."""
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(key) not in (None, "", "none"):
            return f"{key.split('_')[0].lower()}-{os.environ[key]}"
    return time.strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("memtrain_run_id", run_id, use_cache=True, replace=True)


def resolve_devices(devices: Any, accelerator: str) -> Any:
    """``auto``: the launcher's processes per node, else every GPU, else 2 CPU processes (gloo)."""
    if devices != "auto":
        return devices
    launched = detect_launched_world(os.environ)
    if launched is not None and launched.local_world_size:
        return launched.local_world_size
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2


def memtrain_config(cfg: DictConfig) -> MemTrainConfig:
    sections = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in MemTrainConfig.section_names() if k in cfg}
    return MemTrainConfig.from_dict(sections)


def data_loaders(cfg: DictConfig, seq_len: int) -> tuple[DataLoader, DataLoader]:
    corpus = ByteCorpus(build_stdlib_corpus(cfg.data.max_bytes, cfg.data.root), seq_len)
    train, val = corpus.split(cfg.data.val_fraction)
    kw = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, drop_last=True)
    # Lightning swaps in a DistributedSampler (shuffled for training) over every rank.
    return DataLoader(train, shuffle=True, **kw), DataLoader(val, shuffle=False, **kw)


def train(cfg: DictConfig) -> dict[str, Any]:
    """One job: returns the summary (also printed and written to summary.json on rank 0)."""
    config = memtrain_config(cfg)  # validated before any process starts
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["devices"] = resolve_devices(trainer_kwargs["devices"], trainer_kwargs["accelerator"])
    if HydraConfig.get().mode == RunMode.MULTIRUN and detect_launched_world(os.environ) is None:
        if trainer_kwargs["devices"] not in (1, "1"):
            raise RuntimeError(
                "Hydra sweeps (-m) must be launched externally: Lightning's own launcher re-runs the command "
                "line and breaks the sweep. Use `torchrun --standalone --nproc_per_node N -m memtrain.cli.train "
                "-m launcher=torchrun ...`, or srun / launcher=slurm."
            )
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    module = GPTModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.trainer.max_steps,
    )
    telemetry = MemTrainTelemetry(every_n_steps=cfg.callbacks.telemetry_every_n_steps)
    callbacks: list[Any] = [telemetry]
    every = cfg.callbacks.checkpoint_every_n_train_steps
    if every:
        callbacks.append(ModelCheckpoint(dirpath=output_dir / "checkpoints", every_n_train_steps=every, save_last=True))
    trainer = L.Trainer(
        strategy=MemTrainStrategy(config),
        callbacks=callbacks,
        logger=CSVLogger(output_dir, name="logs"),
        enable_checkpointing=bool(every),
        default_root_dir=output_dir,
        **trainer_kwargs,
    )
    train_loader, val_loader = data_loaders(cfg, module.model_config.seq_len)
    trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.ckpt_path)
    summary = summarize(trainer, module, telemetry.summary)
    if trainer.is_global_zero:
        print(format_summary(summary), flush=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(trainer: L.Trainer, module: GPTModule, figures: dict[str, float]) -> dict[str, Any]:
    losses = module.loss_history
    tail = losses[-10:] if losses else [float("nan")]
    return {
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "tokens_per_s": figures.get("tokens_per_s", 0.0),
        "initial_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail),
        "bytes_per_rank": {k: int(figures.get(f"{k}_bytes", 0)) for k in ("params", "grads", "optimizer_state")},
        "peak_memory_bytes": int(figures.get("peak_memory_bytes", 0)),
        "sharding": trainer.strategy.memtrain_config.to_dict()["sharding"],
    }


def format_summary(s: dict[str, Any]) -> str:
    mib = {k: f"{v / 2**20:.2f} MiB" for k, v in s["bytes_per_rank"].items()}
    ratio = s["final_loss"] / s["initial_loss"] if s["initial_loss"] else float("nan")
    return (
        f"memtrain summary: {s['steps']} steps on {s['world_size']} ranks, ZeRO stage {s['sharding']['stage']}"
        f"{' hybrid' if s['sharding']['hybrid'] else ''}\n"
        f"  tokens/s   {s['tokens_per_s']:.0f}\n"
        f"  loss       {s['initial_loss']:.3f} -> {s['final_loss']:.3f} ({ratio:.0%} of initial)\n"
        f"  per rank   params {mib['params']}, grads {mib['grads']}, optimizer state {mib['optimizer_state']}, "
        f"peak process memory {s['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


def cli() -> None:
    """``memtrain-train``: the Hydra app, then, in a distributed worker, an exit that skips the interpreter's
    teardown (torch's gloo threads outlive the process group and can abort it; see ``exit_worker``)."""
    main()
    if dist.is_initialized():
        exit_worker(0)


if __name__ == "__main__":
    cli()
