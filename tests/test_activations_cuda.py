"""Activation policies on CUDA: side-stream copies into page-locked arenas, event-bounded reuse, prefetch.

Run by scripts/gpu_check.sh. Swap must give bitwise the gradients of no policy (a reused pinned arena or a
source freed before its copy finished would corrupt them); the peak follows the plan as on CPU.
"""
from __future__ import annotations

import pytest
import torch

from memtrain.activations import apply_activations
from memtrain.config import ActivationsConfig
from memtrain.models import GPT, GPTConfig
from tests.parity import global_batch, make_optimizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = GPTConfig(vocab_size=256, seq_len=256, n_layer=6, n_head=4, n_embd=256, bias=False)
STEPS, BATCH = 5, 4


def _train(policy: dict | None, bf16: bool, tmp_path) -> tuple[list, dict, object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    manager = apply_activations(model, ActivationsConfig(**policy)) if policy else None
    opt = make_optimizer(model)
    grads = []
    for step in range(STEPS):
        x, y = (t.cuda() for t in global_batch(step, BATCH, CFG))
        # The math attention kernel, in forward and in backward (where recompute reruns the forward): the flash
        # and memory-efficient backward kernels accumulate with atomics, so two runs of the same policy could
        # differ in the last bits; bitwise parity needs a deterministic run.
        with sdpa_kernel(SDPBackend.MATH):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(x, y)
            loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, manager


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", [{"policy": "swap"}, {"policy": "swap", "tier": "nvme"}, {"policy": "recompute"},
                                    {"policy": "swap", "keep_last_blocks": 0, "prefetch_blocks": 2}])
def test_swap_and_recompute_are_bitwise_on_cuda(policy: dict, bf16: bool, tmp_path) -> None:
    if policy.get("tier") == "nvme":
        policy = {**policy, "nvme_path": str(tmp_path)}
    want_g, want_p, _ = _train(None, bf16, tmp_path)
    got_g, got_p, manager = _train(policy, bf16, tmp_path)
    for g, w in zip(got_g, want_g):
        for name in w:
            assert torch.equal(g[name], w[name]), name
    for name in want_p:
        assert torch.equal(got_p[name], want_p[name]), name
    if policy["policy"] == "swap":
        assert manager.transfers.pool.pin and sum(manager.accounting.moved_bytes.values()) > 0
        assert manager.accounting.resident_bytes == 0


def test_split_on_cuda_matches_no_policy(tmp_path) -> None:
    """Token-wise split: the swapped tokens' copies on the side stream, the others recomputed (fp32: a different
    row blocking of the token-parallel matmuls, so a tight tolerance, not bitwise)."""
    want_g, want_p, _ = _train(None, False, tmp_path)
    got_g, got_p, manager = _train({"policy": "split", "swap_fraction": 0.5}, False, tmp_path)
    for name in want_g[0]:
        torch.testing.assert_close(got_g[0][name], want_g[0][name], rtol=1e-4, atol=1e-5, msg=name)
    for name in want_p:
        torch.testing.assert_close(got_p[name], want_p[name], rtol=1e-3, atol=1e-5, msg=name)
    assert manager.transfers.cuda and manager.accounting.moved_bytes["cpu"] > 0


def test_auto_on_cuda_follows_its_plan(tmp_path) -> None:
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    keep = apply_activations(model, ActivationsConfig(policy="keep"))
    opt = make_optimizer(model)
    x, y = (t.cuda() for t in global_batch(0, BATCH, CFG))
    model.loss(x, y).backward()
    kept = keep.accounting.peak_bytes
    keep.remove()
    del model._memtrain_activations
    manager = apply_activations(model, ActivationsConfig(policy="auto", memory_budget=kept // 3))
    for step in range(3):
        x, y = (t.cuda() for t in global_batch(step, BATCH, CFG))
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    manager.accounting.reset_peak()
    x, y = (t.cuda() for t in global_batch(4, BATCH, CFG))
    model.loss(x, y).backward()
    torch.cuda.synchronize()
    print(manager.plan.table())
    measured, predicted = manager.accounting.peak_bytes, manager.plan.predicted_peak
    assert abs(measured - predicted) <= 0.1 * predicted, (measured, predicted)
