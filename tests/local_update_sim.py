"""An independent single-process simulation of local-update training, for the golden-value tests.

R replicas are R plain models in one process, each with its own optimizer and its slice of every global batch.
The outer step is written out per parameter tensor, out of place, straight from the definitions in
``memtrain/local_update/outer.py``'s docstring; no memtrain code runs here.
"""
from __future__ import annotations

from typing import Any

import torch

from tests.parity import global_batch, make_optimizer, tiny_gpt


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


OPTIMIZERS = {"adamw": make_optimizer, "sgd": sgd}


def simulate(replicas: int, steps: int, batch: int, lu: dict[str, Any], optimizer: str = "adamw",
             split: str = "contiguous") -> list[dict[str, torch.Tensor]]:
    """Parameters of every replica after ``steps``. ``split``: replica r trains on the r-th contiguous slice of
    each global batch, or ("strided", a DistributedSampler without shuffling) on rows r, r + R, ..."""
    tau = lu["tau"]
    asynchronous = lu.get("asynchronous", True)
    lr, beta = lu.get("outer_lr", 1.0), lu.get("outer_momentum", 0.0)
    clip, penalty = lu.get("outer_clip"), lu.get("staleness_penalty", False)
    nesterov = lu.get("outer_optimizer", "sgd") == "nesterov"

    models = [tiny_gpt() for _ in range(replicas)]
    opts = [OPTIMIZERS[optimizer](m) for m in models]
    params = [dict(m.named_parameters()) for m in models]
    names = list(params[0])
    anchor = {n: params[0][n].detach().clone() for n in names}
    momentum = {n: torch.zeros_like(anchor[n]) for n in names}
    last = {n: torch.zeros_like(anchor[n]) for n in names}
    base = [{n: p[n].detach().clone() for n in names} for p in params]
    in_flight = None

    def outer(mean_g: dict[str, torch.Tensor]) -> None:
        for n in names:
            d = mean_g[n]
            if penalty:
                rms = d.pow(2).mean().sqrt()
                d = d / (1 + last[n].abs() / (rms + 1e-12))
            momentum[n] = beta * momentum[n] + d
            if clip is not None:
                momentum[n] = momentum[n].clamp(-clip, clip)
            u = d + beta * momentum[n] if nesterov else momentum[n]
            last[n] = -lr * u
            anchor[n] = anchor[n] + last[n]

    for step in range(steps):
        x, y = global_batch(step, batch)
        for r in range(replicas):
            rows = slice(r, None, replicas) if split == "strided" else slice(*_bounds(r, replicas, batch))
            models[r].loss(x[rows], y[rows]).backward()
            opts[r].step()
            opts[r].zero_grad()
        if (step + 1) % tau:
            continue
        g = [{n: base[r][n] - params[r][n].detach() for n in names} for r in range(replicas)]
        mean_g = {n: sum(g[r][n] for r in range(replicas)) / replicas for n in names}
        with torch.no_grad():
            if not asynchronous:
                outer(mean_g)
                new = [{n: anchor[n].clone() for n in names} for _ in range(replicas)]
            else:
                if in_flight is not None:
                    outer(in_flight)
                in_flight = mean_g
                new = [{n: anchor[n] - g[r][n] for n in names} for r in range(replicas)]
            for r in range(replicas):
                for n in names:
                    params[r][n].copy_(new[r][n])
                base[r] = {n: new[r][n].clone() for n in names}
    return [{n: p[n].detach().clone() for n in names} for p in params]


def _bounds(r: int, replicas: int, batch: int) -> tuple[int, int]:
    per = batch // replicas
    return r * per, (r + 1) * per
