"""Shared pieces of the parity tests: a tiny GPT, deterministic data, and the plain single-process reference."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from memtrain.models import GPT, GPTConfig

# No biases: the key bias gets an exactly-zero true gradient (softmax is shift-invariant), and Adam would
# blow its round-off noise up to lr-sized steps that differ between any two reduction orders.
TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, n_embd=32, bias=False)
LR = 1e-2
BATCH_SIZE = 8


def tiny_gpt(seed: int = 0, cfg: GPTConfig = TINY) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def global_batch(step: int, batch_size: int, cfg: GPTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def rank_slice(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per = t.shape[0] // world_size
    return t[rank * per : (rank + 1) * per]


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)


def reference_run(steps: int, batch_size: int, clip: float | None = None, accumulate: int = 1,
                  bf16: bool = False) -> dict[str, Any]:
    """Plain single-process training on the whole global batch."""
    model = tiny_gpt()
    opt = make_optimizer(model)
    losses = []
    for step in range(steps):
        x, y = global_batch(step, batch_size)
        total = 0.0
        for micro in range(accumulate):
            xs, ys = rank_slice(x, micro, accumulate), rank_slice(y, micro, accumulate)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(xs, ys) / accumulate
            loss.backward()
            total += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    return out


def mean_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def assert_close_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5,
                        atol: float = 1e-6) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def rank_backward(engine: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
                  accumulate: int = 1) -> float:
    """Forward + backward of this rank's slice of a global batch in ``accumulate`` micro-batches, gradients
    synchronized on the last one only; returns the summed loss."""
    x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)
    total = 0.0
    for micro in range(accumulate):
        xs, ys = rank_slice(x, micro, accumulate), rank_slice(y, micro, accumulate)
        sync = micro == accumulate - 1
        with (torch.enable_grad() if sync else engine.no_gradient_sync(model)):
            loss = model.loss(xs, ys) / accumulate
            loss.backward()
        total += loss.item()
    return total


def engine_train(rank: int, world: int, sharding: dict[str, Any], steps: range, batch_size: int, *,
                 clip: float | None = None, accumulate: int = 1, local_world: int | None = None,
                 load_from: str | None = None, save_to: str | None = None) -> dict[str, Any]:
    """The straight training loop on memtrain's engine: rank ``rank`` takes its slice of each global batch."""
    from memtrain import Engine, MemTrainConfig

    engine = Engine.create(MemTrainConfig.from_dict({"sharding": sharding}), world, local_world or world, "cpu")
    model = engine.prepare_model(tiny_gpt())
    opt = engine.prepare_optimizer(make_optimizer(model), model)
    if load_from is not None:
        engine.load_checkpoint(load_from, model, opt)
    losses = []
    for step in steps:
        x, y = global_batch(step, batch_size)
        total = rank_backward(engine, model, x, y, rank, world, accumulate)
        if clip is not None:
            engine.clip_grad_norm_(model, clip)
        opt.step()
        report = engine.memory(model, opt)  # after the step: gradients and optimizer state both exist
        opt.zero_grad()
        losses.append(mean_across_ranks(total))
    if save_to is not None:
        engine.save_checkpoint(save_to, model, opt, meta={"step": steps.stop})
    return {"losses": losses, "params": full_params(model), "memory": report.bytes}
