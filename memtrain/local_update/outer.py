"""The outer optimizer of local-update training: CO2's outer step, SlowMo's momentum, DiLoCo's Nesterov.

Notation (one replica group; all flat fp32 vectors, identical on every replica because every input is):
  A        the anchor (the "outer" parameters, x_{t,0} in CO2), after the previous outer step
  g_bar    the pseudo-gradient: the replicas' mean of (round start - round end), i.e. minus their average
           local progress over one round of tau steps (CO2 / SlowMo: x_{t,0} - mean_i x^{(i)}_{t,tau})
  m        the outer momentum;  s  the previous outer step (A after it minus A before it)

One outer step (CO2, Sun et al. 2024, arXiv 2401.16265; SlowMo, Wang et al. 2020). We could not reach the CO2
paper's body, so no equation numbers are cited: the step follows its abstract and the reference implementation
(fairscale-CO2 ``co2.py``: momentum from the pseudo-gradient divided by the gap penalty, element-wise clamp of
the momentum, anchor minus outer lr times momentum), with the reference's defects fixed (see below):
  d  = g_bar / Lambda                         staleness gap penalty (asynchronous mode only), see below
  m  = beta * m + d                           outer momentum
  m  = clamp(m, -phi, phi)                    outer momentum clipping, element-wise, *in place*
  u  = m            ("sgd", heavy ball)  or   u = d + beta * m  ("nesterov", DiLoCo's outer Nesterov)
  A  = A - alpha * u
With alpha = 1 and beta = 0 the step is plain periodic averaging (local SGD): A becomes the replicas' mean.

Staleness gap penalty. In asynchronous mode g_bar was measured around the anchor *before* the previous outer
step but is applied *after* it: the model has moved by s in between. CO2 penalises the stale update by that
gap (after Gap-Aware, Barkai et al. 2020). Our reading, stated exactly: element-wise, with the gap measured in units of the update it scales,
    Lambda = 1 + |s| / (rms(g_bar over the tensor) + eps)        (per parameter tensor, i.e. layer-wise)
(the rms is over the whole tensor, also when this rank holds a shard of it: one small all-reduce over the
shard group, so the penalty is the same at every ZeRO stage; with the outer state sharded across replicas each
owner holds a slice of A, m, s and the rms sums the owners' pieces, see ``sharded.py``)
so Lambda = 1 (no penalty) while the model has not moved, and an element whose anchor moved by k times the
pseudo-gradient's typical size gets its update divided by 1 + k. The reference implementation (fairscale-CO2
``co2.py``) divided by a constant; its clipping called ``torch.clamp`` out of place and dropped the result.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-12


class OuterOptimizer:
    def __init__(self, anchor: torch.Tensor, segments: list[tuple[int, int]], *, optimizer: str, lr: float,
                 momentum: float, clip: float | None, staleness_penalty: bool,
                 tensor_numels: list[int] | None = None,
                 sum_over_shards: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.anchor = anchor
        self.segments = segments  # (offset, numel) of this rank's piece of every parameter tensor
        self.tensor_numels = tensor_numels or [n for _, n in segments]  # whole tensors' sizes
        self.sum_over_shards = sum_over_shards
        self.nesterov = optimizer == "nesterov"
        self.lr, self.beta, self.clip, self.penalty = lr, momentum, clip, staleness_penalty
        self.momentum = torch.zeros_like(anchor) if momentum > 0 or clip is not None else None
        self.last_step = torch.zeros_like(anchor) if staleness_penalty else None
        self.steps = 0

    @torch.no_grad()
    def gap_penalty(self, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """Lambda, element-wise (>= 1)."""
        assert self.last_step is not None
        squares = torch.stack([pseudo_grad[o : o + n].square().sum() for o, n in self.segments])
        squares = self.sum_over_shards(squares)
        rms = squares.div_(torch.tensor(self.tensor_numels, dtype=squares.dtype, device=squares.device)).sqrt_()
        scale = torch.empty_like(pseudo_grad)
        for (offset, n), r in zip(self.segments, rms.tolist()):
            scale[offset : offset + n] = r + EPS
        return self.last_step.abs().div_(scale).add_(1.0)

    @torch.no_grad()
    def step(self, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """Apply one outer step with the replicas' mean pseudo-gradient; returns the new anchor."""
        self.update(pseudo_grad)
        self.steps += 1
        return self.anchor

    @torch.no_grad()
    def update(self, pseudo_grad: torch.Tensor) -> torch.Tensor:
        """The math of ``step`` without counting it: the sharded round (``sharded.py``) updates on the background
        thread, and the step is counted when the training thread applies it, as in the unsharded path."""
        d = pseudo_grad.to(self.anchor.device, torch.float32)
        if self.penalty:
            d = d / self.gap_penalty(d)
        if self.momentum is not None:
            self.momentum.mul_(self.beta).add_(d)
            if self.clip is not None:
                self.momentum.clamp_(-self.clip, self.clip)
            update = d.add(self.momentum, alpha=self.beta) if self.nesterov else self.momentum
        else:
            update = d
        if self.last_step is not None:
            torch.mul(update, -self.lr, out=self.last_step)
            self.anchor.add_(self.last_step)
        else:
            self.anchor.add_(update, alpha=-self.lr)
        return self.anchor

    @property
    def state_bytes(self) -> int:
        """Bytes of outer state this rank holds (anchor, momentum, previous step)."""
        return sum(t.numel() * t.element_size() for t in (self.anchor, self.momentum, self.last_step) if t is not None)

    def state_dict(self) -> dict[str, object]:
        return {"anchor": self.anchor, "momentum": self.momentum, "last_step": self.last_step, "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        for key in ("anchor", "momentum", "last_step"):
            mine, saved = getattr(self, key), state[key]
            if (mine is None) != (saved is None):
                raise ValueError(f"checkpointed outer state has {'no ' if saved is None else ''}{key}, this "
                                 "configuration needs the opposite: resume with the local_update settings it was saved with")
            if mine is not None:
                mine.copy_(saved)
        self.steps = int(state["steps"])
