"""The second front door: memtrain's engine in a straight training loop, no Lightning.

    torchrun --standalone --nproc_per_node 2 scripts/train.py                  # defaults of configs/train.yaml
    torchrun --standalone --nproc_per_node 2 scripts/train.py sharding.stage=2 trainer.max_steps=50
    torchrun --standalone --nproc_per_node 2 scripts/train.py ckpt_path=outputs/<run>/checkpoints/step-100
    python scripts/train.py --plain ...        # the plain single-process reference (no memtrain) for parity

Settings are the Hydra app's (configs/train.yaml), composed from the same overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from memtrain import Engine, MemTrainConfig
from memtrain.checkpoint.sharded import atomic_torch_save
from memtrain.cli.gpt_module import warmup_cosine
from memtrain.cli.train import CONFIG_DIR, memtrain_config, run_id
from memtrain.distributed import exit_worker, init_process_group
from memtrain.data import ByteCorpus, ResumableDistributedSampler, build_stdlib_corpus
from memtrain.models import GPT, GPTConfig


def load_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.95), foreach=True)


def batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # epochs follow each other; the sampler advances its epoch at the end of each pass
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def rank_state_now(sampler: ResumableDistributedSampler, use_cuda: bool, device: torch.device) -> dict[str, Any]:
    """This rank's data position and random state at a step boundary."""
    return {"sampler": sampler.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if use_cuda else None}


def train(cfg: DictConfig, plain: bool = False) -> dict[str, Any]:
    config: MemTrainConfig = memtrain_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if plain and world != 1:
        raise SystemExit("--plain is the single-process reference: run it with python, not torchrun")
    if not plain:
        Engine.plan(config, world, local_world)  # a mesh that cannot work fails here, before any process group
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    engine = None
    if not plain:
        init_process_group("nccl" if use_cuda else "gloo")  # safe across torchrun's restarts
        engine = Engine.create(config, world, local_world, device.type)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**OmegaConf.to_container(cfg.model, resolve=True))).to(device)
    if engine is not None:
        engine.prepare_model(model)
    optimizer = build_optimizer(model, cfg)
    clip = cfg.trainer.gradient_clip_val
    # An offloaded optimizer that updates blocks during backward clips inside its step (after backward is too late).
    clip_in_step = engine is not None and bool(clip) and config.offload.enabled and config.offload.overlap_backward
    if engine is not None:
        engine.prepare_optimizer(optimizer, model, max_grad_norm=clip if clip_in_step else None)

    corpus = ByteCorpus(build_stdlib_corpus(cfg.data.max_bytes, cfg.data.root), model.config.seq_len)
    train_set, _ = corpus.split(cfg.data.val_fraction)
    sampler = ResumableDistributedSampler(len(train_set), rank, world, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                        num_workers=0, pin_memory=use_cuda)

    ckpt_dir = Path(cfg.callbacks.checkpoint_dir or Path("outputs") / run_id() / "checkpoints")
    if engine is not None:  # rank 0's choice: without a launcher run id, ranks' timestamps may differ
        box = [ckpt_dir]
        dist.broadcast_object_list(box, src=0)
        ckpt_dir = box[0]
    step = 0
    # After a crash (torchrun --max-restarts): the newest snapshot from the keepers, peers or durable folder.
    restored = engine.restore(model, optimizer) if engine is not None else None
    if restored is not None:
        step, rank_state = restored.step, restored.rank_state
    elif cfg.ckpt_path:
        if engine is None:
            raise SystemExit("--plain runs do not resume")
        meta, rank_state = engine.load_checkpoint(cfg.ckpt_path, model, optimizer)
        step = meta["step"]
    if restored is not None or cfg.ckpt_path:
        if rank_state is not None:  # same world size: continue at the exact sample
            sampler.load_state_dict(rank_state["sampler"])
            torch.set_rng_state(rank_state["rng"])
            if use_cuda and rank_state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(rank_state["cuda_rng"], device)

    max_steps, accumulate = cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches
    every = cfg.callbacks.checkpoint_every_n_train_steps
    data = batches(loader, device)
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    while step < max_steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * warmup_cosine(step, cfg.optim.warmup_steps, max_steps)
        step_loss = 0.0
        for micro in range(accumulate):
            x, y = next(data)
            sync = engine is None or micro == accumulate - 1
            with (torch.enable_grad() if sync else engine.no_gradient_sync(model)):
                loss = model.loss(x, y) / accumulate
                loss.backward()
            step_loss += loss.item()
            tokens += x.numel() * world
        if clip and not clip_in_step:
            if engine is not None:
                engine.clip_grad_norm_(model, clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        memory = Engine.memory(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)
        if engine is not None:  # lazy: copied while the next step computes
            engine.snapshot(step, model, optimizer, meta={"step": step, "world_size": world, "config": config.to_dict()},
                            rank_state=rank_state_now(sampler, use_cuda, device))
        if rank == 0 and (step % cfg.trainer.log_every_n_steps == 0 or step == max_steps):
            print(f"step {step}/{max_steps} loss {step_loss:.4f} tokens/s {tokens / (time.perf_counter() - start):.0f}",
                  flush=True)
        if every and (step % every == 0 or step == max_steps):
            if engine is None:  # the plain reference keeps just its weights, for parity checks
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(model.state_dict(), ckpt_dir / f"step-{step}.pt")
                continue
            engine.save_checkpoint(ckpt_dir / f"step-{step}", model, optimizer,
                                   meta={"step": step, "world_size": world, "config": config.to_dict()},
                                   rank_state=rank_state_now(sampler, use_cuda, device))

    if engine is not None and engine.checkpoints is not None:
        engine.checkpoints.wait()  # the last snapshot's replica and flush
    summary = {
        "world_size": world, "steps": step, "tokens_per_s": tokens / (time.perf_counter() - start),
        "initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "bytes_per_rank": {c: memory.total(c) for c in ("params", "grads", "optimizer_state")} if losses else {},
        "checkpoint_dir": str(ckpt_dir) if every else None,
        "snapshots": engine.checkpoints.status() if engine is not None and engine.checkpoints is not None else None,
    }
    if rank == 0:
        print("memtrain summary: " + json.dumps(summary), flush=True)
    if engine is not None:
        engine.close(finished=True)  # snapshots still copying, a local-update round still reducing
        dist.destroy_process_group()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="plain single-process run without memtrain")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    args = parser.parse_args()
    train(load_config(args.overrides), plain=args.plain)
    if not args.plain:
        exit_worker(0)  # torch's gloo threads outlive the process group and can abort the interpreter's teardown


if __name__ == "__main__":
    main()
