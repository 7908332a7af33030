"""Host memory with parameters and optimizer state on NVMe stays within the configured budget plus a fixed
overhead, on a model whose whole training state is several times that budget."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed

BUDGET = 192 * 2**20


def fixed_overhead(largest_unit_bytes: int) -> int:
    """What a training process holds besides memtrain's own buffers, stated: FSDP2's working set of at most ten
    units' worth (the root's gathered parameters and their gradient, kept through backward; the block being
    computed and the one FSDP2 prefetches; a block's unreduced gradient, the reduce-scatter buffer and the
    reduced gradients queued for their update), plus 64 MiB for activations and allocator slack."""
    return 10 * largest_unit_bytes + 64 * 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _train_and_measure(rank: int, world: int, nvme: str, offload: bool) -> dict[str, Any]:
    from memtrain import Engine, MemTrainConfig
    from memtrain.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=4096, seq_len=64, n_layer=8, n_head=8, n_embd=768, bias=False)
    sections: dict[str, Any] = {"sharding": {"stage": 3}}
    if offload:
        sections["offload"] = {"optimizer": "nvme", "params": "nvme", "nvme_path": nvme,
                               "host_memory_budget": BUDGET, "tile_size": "4MiB"}
    engine = Engine.create(MemTrainConfig.from_dict(sections), world, world, "cpu")
    rss_before_model = _status("VmRSS")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)

    def materialize(m: torch.nn.Module) -> None:
        m.to_empty(device="cpu")
        for module in m.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    engine.prepare_model(model, materialize=materialize)
    opt = engine.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), model)
    numel = sum(p.numel() for p in model.parameters())
    largest = max(u.numel for u in opt._memtrain_offload.units) * 4 if offload else 0
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: training, not building the model
    losses = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        data = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=g)
        loss = model.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peak = _status("VmHWM")
    engine.offload.close()
    return {"peak": peak, "before": rss_before_model, "numel": numel, "losses": losses, "largest_unit": largest}


@pytest.mark.slow
def test_peak_rss_with_nvme_offload_stays_within_budget_plus_fixed_overhead(tmp_path: Path) -> None:
    (got,) = run_distributed(_train_and_measure, 1, str(tmp_path), True)
    (plain,) = run_distributed(_train_and_measure, 1, str(tmp_path), False)
    state_bytes = 16 * got["numel"]  # fp32 parameters, gradients, two Adam moments
    overhead = fixed_overhead(got["largest_unit"])
    assert state_bytes > 4 * BUDGET and state_bytes > 1.5 * (BUDGET + overhead)  # far more than may be resident
    assert all(math.isfinite(x) for x in got["losses"])
    grown = got["peak"] - got["before"]
    print(f"training state {state_bytes / 2**20:.0f} MiB; peak RSS growth with NVMe offload {grown / 2**20:.0f} MiB "
          f"(budget {BUDGET / 2**20:.0f} + overhead {overhead / 2**20:.0f}); without offload "
          f"{(plain['peak'] - plain['before']) / 2**20:.0f} MiB")
    assert grown <= BUDGET + overhead
    assert plain["peak"] - plain["before"] > state_bytes * 0.9  # the same run without offload holds it all
    assert got["losses"] == plain["losses"]  # and trains the same
