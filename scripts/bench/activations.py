"""Benchmark: activation memory vs step time for the reference GPT at several sequence lengths, in one run.

    python scripts/bench/activations.py --seq-lens 256 512 1024 --out bench_results/activations.json
    python scripts/bench/activations.py --device cuda --seq-lens 2048 4096 8192 --layers 8 --embd 512 ...

Contenders, per sequence length (one fresh model each, same seed and data):
  none          no policy: autograd keeps every saved tensor
  recompute     torch.utils.checkpoint (non-reentrant) on every block
  save_on_cpu   torch.autograd.graph.save_on_cpu (pinned on CUDA): every saved tensor copied to host, synchronously
  mt-swap       memtrain swap to the cpu tier (last block kept)
  mt-split      memtrain token-wise split, half the tokens swapped, the rest recomputed (last block kept)
  mt-auto-rc    memtrain auto with the budget = what full recompute holds (target: >= 15% faster than recompute)
  mt-auto-3x    memtrain auto with the budget = 1/3 of what no policy holds (target: <= 1.1x its step time)
                (a budget below what any plan reaches is raised to the smallest reachable one; the output says so)

Columns: ``resident`` = the peak of saved-activation bytes held on the compute device over one step (forward and
backward), counted by ``memtrain.telemetry``'s saved-tensor accounting for every contender (the whole model:
blocks, embedding and head; a recomputed block's rerun in backward included); ``cuda peak`` = ``torch.cuda.max_memory_allocated`` over the step minus what was
allocated before it (GPU only); ``step`` = median seconds per training step (forward, backward, AdamW) over
``--steps`` steps after ``--warmup`` (auto profiles and plans during the warm-up), the contenders timed
round-robin (one step of each in turn); the auto contenders run in a second round beside the no-policy and
recompute baselines again (``none@auto``, ``recompute@auto``), with which their ratios are computed. On a CPU-only machine the
compute device is the host: the "cpu" tier and save_on_cpu are host-to-host copies there, so their memory is
moved, not saved, and their time is the copy cost with no overlap (no side stream exists).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memtrain.activations import apply_activations  # noqa: E402
from memtrain.activations.planner import UnreachableBudget  # noqa: E402
from memtrain.activations.recompute import recompute  # noqa: E402
from memtrain.config import ActivationsConfig  # noqa: E402
from memtrain.models import GPT, GPTConfig  # noqa: E402
from memtrain.telemetry import SavedTensorAccounting, count_saved_tensors  # noqa: E402


def batches(cfg: GPTConfig, batch: int, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        data = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
        out.append((data[:, :-1].to(device), data[:, 1:].to(device)))
    return out


def wrap_full_recompute(model: GPT, accounting: SavedTensorAccounting) -> None:
    """torch.utils.checkpoint (non-reentrant) on every block, through memtrain's ``recompute`` only so that the
    rerun's re-saved tensors are counted as they are for memtrain's contenders (the hooks outside cannot see them)."""
    for block in model.blocks:
        original = block.forward
        block.forward = lambda x, _f=original: recompute(_f, (x,), {}, accounting)


class Contender:
    """One model under one policy; ``step`` runs one training step and returns its seconds."""

    def __init__(self, name: str, cfg: GPTConfig, args: argparse.Namespace, device: torch.device,
                 policy: dict[str, Any] | None = None, blocks_apart: bool = False) -> None:
        """``blocks_apart``: count the blocks (the manager's accounting) apart from the rest of the model."""
        torch.manual_seed(0)
        self.name, self.cfg, self.device, self.blocks_apart = name, cfg, device, blocks_apart
        self.model = GPT(cfg).to(device)
        self.manager = None
        self.accounting = SavedTensorAccounting()
        if name == "recompute":
            wrap_full_recompute(self.model, self.accounting)
        elif policy is not None:
            self.manager = apply_activations(self.model, ActivationsConfig(**policy))
            if not blocks_apart:  # the blocks count themselves; the rest is counted around them, same total
                self.accounting = self.manager.accounting
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.cuda = device.type == "cuda"
        self.bf16 = args.bf16
        self.times: list[float] = []
        self.cuda_peaks: list[int] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, timed: bool) -> None:
        if self.name == "save_on_cpu":
            outer: Any = torch.autograd.graph.save_on_cpu(pin_memory=self.cuda)
        else:
            outer = count_saved_tensors(self.accounting)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        with outer, amp:
            loss = self.model.loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)
            if self.cuda:
                self.cuda_peaks.append(torch.cuda.max_memory_allocated(self.device) - before)

    def result(self, steps: int) -> dict[str, Any]:
        out = {
            "contender": self.name,
            "seq_len": self.cfg.seq_len,
            "step_s": statistics.median(self.times),
            "step_s_all": self.times,
            "resident_peak_bytes": self.accounting.peak_bytes,
            "moved_bytes_per_step": sum(self.accounting.moved_bytes.values()) // max(1, steps),
            "cuda_peak_bytes": max(self.cuda_peaks) if self.cuda_peaks else None,
        }
        if self.manager is not None:
            if self.blocks_apart:
                out["blocks_peak_bytes"] = self.manager.accounting.peak_bytes
            out["policies"] = [str(p) for p in self.manager.policies]
            if self.manager.plan is not None:
                out["plan"] = self.manager.plan.table()
                out["predicted_peak_blocks"] = self.manager.plan.predicted_peak
            self.manager.close()
        return out


def auto_contender(name: str, cfg: GPTConfig, args: argparse.Namespace, device: torch.device,
                   budget: int) -> tuple[Contender, dict[str, Any]]:
    """memtrain auto at ``budget`` bytes for the blocks, or at the smallest budget any plan reaches when that is
    more (the planner refuses a smaller one in the first forward); the budget used is reported."""
    auto = Contender(name, cfg, args, device, {"policy": "auto", "memory_budget": budget})
    x, y = batches(cfg, args.batch, 1, device)[0]
    try:
        auto.step(x, y, timed=False)
        return auto, {"budget_bytes": budget, "budget_raised_to_smallest": False}
    except UnreachableBudget as err:
        auto.manager.close()  # type: ignore[union-attr]
        raised = Contender(name, cfg, args, device, {"policy": "auto", "memory_budget": err.smallest})
        return raised, {"budget_bytes": err.smallest, "budget_raised_to_smallest": True, "budget_wanted": budget}


def measure(contenders: list[Contender], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Warm every contender up, then time them round-robin (step i of each in turn), so that a machine whose load
    changes slows all of them alike."""
    cfg = contenders[0].cfg
    data = batches(cfg, args.batch, args.warmup + args.steps, device)
    for c in contenders:
        for x, y in data[: args.warmup]:
            c.step(x, y, timed=False)
        c.accounting.reset_peak()
        if c.manager is not None and c.blocks_apart:
            c.manager.accounting.reset_peak()
    for x, y in data[args.warmup :]:
        for c in contenders:
            c.step(x, y, timed=True)
    return [c.result(args.steps) for c in contenders]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_results/activations.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for seq in args.seq_lens:
        cfg = GPTConfig(vocab_size=256, seq_len=seq, n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                        bias=False)
        fixed = [Contender(name, cfg, args, device, policy) for name, policy in (
            ("none", None), ("recompute", None), ("save_on_cpu", None),
            ("mt-swap", {"policy": "swap", "tier": "cpu"}),
            ("mt-split", {"policy": "split", "swap_fraction": 0.5}))]
        fixed.append(Contender("mt-keep", cfg, args, device, {"policy": "keep"}, blocks_apart=True))
        rows = {r["contender"]: r for r in measure(fixed, args, device)}
        # The planner's budget covers the blocks; at the end of forward (where keeping everything peaks) the
        # embedding and head hold the same under every policy, so the budget for a whole-model target is the
        # target less what lies outside the blocks. A target below what any plan reaches (full recompute peaks
        # in backward, when the head's tensors are gone) gets the smallest reachable budget, and says so.
        keep_peak = rows["none"]["resident_peak_bytes"]
        outside = keep_peak - rows.pop("mt-keep")["blocks_peak_bytes"]
        rc_peak = rows["recompute"]["resident_peak_bytes"]
        autos, budgets = [], {}
        for name, target in (("mt-auto-rc", rc_peak), ("mt-auto-3x", keep_peak // 3)):
            auto, budgets[name] = auto_contender(name, cfg, args, device, max(target - outside, 1))
            autos.append(auto)
        # Timed beside the no-policy and recompute baselines again, round-robin, on the same machine state.
        baselines = [Contender("none", cfg, args, device), Contender("recompute", cfg, args, device)]
        again = measure(autos + baselines, args, device)
        for r in again:
            r.update(budgets.get(r["contender"], {}))
            r["round"] = "auto"
            if r["contender"] in ("none", "recompute"):
                rows[r["contender"] + "@auto"] = r
            else:
                rows[r["contender"]] = r
        results.extend(rows.values())
        base, rc = rows["none"], rows["recompute"]
        base2, rc2 = rows.get("none@auto", base), rows.get("recompute@auto", rc)
        print(f"\nseq_len {seq}  (layers {args.layers}, embd {args.embd}, batch {args.batch}, {args.device})")
        print(f"{'contender':<14} {'resident MiB':>12} {'vs none':>8} {'cuda peak MiB':>14} {'step ms':>9} "
              f"{'vs none':>8} {'vs recompute':>13}  policies")
        for key, r in rows.items():
            # auto rows are compared with the baselines timed in their own round
            b, c = (base2, rc2) if key.startswith("mt-auto") or "@" in key else (base, rc)
            cuda_peak = f"{r['cuda_peak_bytes'] / 2**20:14.1f}" if r["cuda_peak_bytes"] is not None else f"{'-':>14}"
            print(f"{key:<14} {r['resident_peak_bytes'] / 2**20:12.2f} "
                  f"{r['resident_peak_bytes'] / max(b['resident_peak_bytes'], 1):8.2f} {cuda_peak} "
                  f"{r['step_s'] * 1e3:9.1f} {r['step_s'] / b['step_s']:8.2f} {r['step_s'] / c['step_s']:13.2f}  "
                  f"{' '.join(r.get('policies', []))}"
                  + (f"  [budget {r['budget_bytes'] / 2**20:.2f} MiB"
                     f"{', raised to the smallest reachable' if r['budget_raised_to_smallest'] else ''}]"
                     if "budget_bytes" in r else ""))
        print()
        write(args, results)  # after every sequence length: a run cut short keeps what it measured
    print(f"wrote {args.out}")


def write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": " ".join(sys.argv), "settings": vars(args), "machine": platform.platform(),
        "torch": torch.__version__, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
