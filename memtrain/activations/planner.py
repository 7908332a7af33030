"""The planner: from one profiled step, pick per block keep / recompute / swap / split to fit a memory budget.

Cost model, per block j (bytes and seconds from the profile, bandwidths measured on this machine):

    keep       resident S+K                     extra time 0
    recompute  resident I (the kept input)      extra time F (the forward again)
               + R in its backward (the rerun)
    swap       resident K (small tensors)       extra time: the copies out and back; on CUDA they run on a side
               + S in flight during its forward stream and only the part longer than the next block's forward
               and reloaded ahead of backward   (out) / backward (~2F, in) is paid; on a CPU device all of it
    split(a)   resident K                       extra time (1-a) Ft (recompute of the token-parallel children)
               moves M = (S-Ts) + a Ts + (1-a) P  + the copies of M, as for swap (the recomputed tokens' inputs
                                                  are moved as well and come back before their rerun)

where S = bytes the block saves (distinct storages), K = those below ``min_bytes`` (never moved), I = the block's
input, Ts = the part of S saved inside token-parallel children, P = their inputs, F / Ft = forward time of the
block / of those children. The peak is simulated in the order the bytes are held: in forward, the blocks below
keep what they keep while block j holds its whole working set; in backward, block j's reload and the prefetch
of the blocks below come on top of what is still kept, and so does a recomputed block's rerun (R: everything it
saves again, less its retained input; for split(a), (1-a) times the largest token-parallel child's saved bytes
beyond its input, as the children rerun one at a time). The budget covers the blocks' saved activations (what
the accounting in ``memtrain.telemetry.saved_tensors`` counts for them).

Search: start from keeping everything (the least time); while the peak is over budget, take the change of one
block's policy that lowers the peak most per second it adds. A block whose policy ``activations.blocks`` sets
has that option only (a split without a fraction: its fractions). If that cannot reach the budget, a search that
only minimizes the peak gives the smallest reachable budget, which the error names. That bound depends on
bytes alone, so ``check_budget`` computes it from the warm-up forward, before any backward or update.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from memtrain.activations.manager import BlockPolicy, BlockProfile, Profile
from memtrain.config import ActivationsConfig, ConfigError, format_bytes

# The split fractions the planner weighs, in eighths: the same set for the early budget check (bytes only) and the
# plan (bytes and time), so the smallest budget the check names is the smallest the planner reaches.
SPLIT_FRACTIONS = tuple(i / 8 for i in range(1, 8))


@dataclass(frozen=True)
class Option:
    policy: BlockPolicy
    resident: float  # held after the block's forward, until its backward
    working: float  # held at the end of the block's own forward
    reload: float  # brought back in backward
    extra_s: float  # predicted seconds added to the step
    rerun: float = 0.0  # re-materialized by a recompute in the block's backward, on top of what is held then


@dataclass
class Plan:
    policies: list[BlockPolicy]
    options: list[Option]
    profile: Profile
    budget: int
    predicted_peak: int
    predicted_time_s: float
    bandwidth: tuple[float, float]  # bytes/s out, in
    rows: list[dict[str, Any]] = field(default_factory=list)
    pinned: bool = False  # some blocks' policies were set by activations.blocks (marked * in the table)

    def table(self) -> str:
        out_bw, in_bw = self.bandwidth
        lines = [
            f"memtrain activation plan: budget {self.budget / 2**20:.2f} MiB, predicted peak "
            f"{self.predicted_peak / 2**20:.2f} MiB, predicted step {self.predicted_time_s * 1e3:.1f} ms, "
            f"copy out {out_bw / 1e9:.2f} GB/s, in {in_bw / 1e9:.2f} GB/s ({self.profile.device})",
            f"{'block':>5}  {'policy':<12} {'kept MiB':>9} {'moved MiB':>10} {'fwd ms':>8} {'extra ms':>9}",
        ]
        for row in self.rows:
            lines.append(f"{row['block']:>5}  {row['policy']:<12} {row['kept'] / 2**20:>9.2f} "
                         f"{row['moved'] / 2**20:>10.2f} {row['forward_s'] * 1e3:>8.2f} {row['extra_s'] * 1e3:>9.2f}")
        if self.pinned:
            lines.append("  * set by activations.blocks")
        return "\n".join(lines)


def _transfer_s(nbytes: float, bw: tuple[float, float], overlap: bool, window_out: float, window_in: float) -> float:
    out_s, in_s = nbytes / bw[0], nbytes / bw[1]
    if overlap:
        return max(0.0, out_s - window_out) + max(0.0, in_s - window_in)
    return out_s + in_s


def block_options(profiles: list[BlockProfile], j: int, bw: tuple[float, float], overlap: bool,
                  fixed_fraction: float | None = None) -> list[Option]:
    p = profiles[j]
    forward = max(p.forward_s - p.move_s, 1e-9)
    token_forward = min(p.token_forward_s, forward)
    nxt = profiles[j + 1] if j + 1 < len(profiles) else None
    window_out = max(nxt.forward_s - nxt.move_s, 0.0) if nxt is not None else 0.0
    window_in = 2 * window_out  # the backward of the block above, ~2x its forward
    S, K = p.saved_bytes, p.small_bytes
    opts = [
        Option(BlockPolicy("keep"), S + K, S + K, 0, 0.0),
        # The rerun re-saves everything the block saved; its own input is held already (the retained input).
        Option(BlockPolicy("recompute"), p.input_bytes, p.input_bytes, 0, forward,
               max(S + K - p.input_saved_bytes, 0)),
        Option(BlockPolicy("swap"), K, S + K, S, _transfer_s(S, bw, overlap, window_out, window_in)),
    ]
    if p.token_saved_bytes > 0:
        Ts, P = p.token_saved_bytes, p.token_input_bytes
        # MEMO's fraction, the most tokens whose copies still hide behind compute, is the grid's least extra time.
        fractions = SPLIT_FRACTIONS if fixed_fraction is None else (fixed_fraction,)
        for a in fractions:
            # The recomputed chunk's inputs are saved by the checkpoint inside the block's swap hooks: moved too.
            moved = (S - Ts) + a * Ts + (1 - a) * P
            kept = K
            # Each token-parallel child reruns its recomputed chunk on its own in backward: the largest counts.
            opts.append(Option(BlockPolicy("split", a), kept, moved + kept, moved,
                               (1 - a) * token_forward + _transfer_s(moved, bw, overlap, window_out, window_in),
                               (1 - a) * p.token_rerun_bytes))
    return opts


def configured_options(profiles: list[BlockProfile], j: int, bw: tuple[float, float], overlap: bool,
                       configured: BlockPolicy | None) -> list[Option]:
    """Block j's options, limited to what it was configured to be: all of them (None: the planner chooses), the
    split fractions (split without a fraction), or the one configured policy."""
    if configured is None:
        return block_options(profiles, j, bw, overlap)
    opts = block_options(profiles, j, bw, overlap, configured.fraction if configured.kind == "split" else None)
    kind = configured.kind
    if kind == "split" and not any(o.policy.kind == "split" for o in opts):
        kind = "swap"  # no token-parallel children: a split block swaps whole
    return [o for o in opts if o.policy.kind == kind]


def simulate_peak(options: list[Option], prefetch_blocks: int, overlap: bool = False) -> float:
    """The most bytes held at once, in the order the accounting holds and releases them. ``overlap`` (CUDA): a
    block's device-to-host copies run during the next block's forward, so its sources are held until then.
    One pass each way (the searches call it for every trial)."""
    held, peak, in_flight = 0.0, 0.0, 0.0
    for o in options:
        peak = max(peak, held + o.working + in_flight)
        held += o.resident
        in_flight = o.reload if overlap else 0.0
    peak = max(peak, held + in_flight)
    # Backward at block j: what is still kept (blocks 0..j), block j's reload and the prefetch of the
    # ``prefetch_blocks`` below it, and block j's rerun.
    n = len(options)
    window = sum(o.reload for o in options[max(0, n - 1 - prefetch_blocks):])
    for j in range(n - 1, -1, -1):
        o = options[j]
        peak = max(peak, held + window + o.rerun)
        held -= o.resident
        window -= o.reload
        if j - 1 - prefetch_blocks >= 0:
            window += options[j - 1 - prefetch_blocks].reload
    return peak


class _Peaks:
    """``simulate_peak`` of a plan, and of the plan with one block's option changed in O(prefetch) instead of O(n):
    the searches try every block's every option per move. A change at block m shifts every later event by the
    change in m's resident bytes, and the backward events of m .. m+prefetch by the change in its reload."""

    def __init__(self, options: list[Option], prefetch: int, overlap: bool) -> None:
        self.options, self.prefetch, self.overlap = options, prefetch, overlap
        n = len(options)
        self.held = [0.0] * (n + 1)  # held[j]: resident bytes of blocks 0 .. j-1
        for j, o in enumerate(options):
            self.held[j + 1] = self.held[j] + o.resident
        self.forward = [self.held[j] + o.working + self._in_flight(j - 1) for j, o in enumerate(options)]
        self.end = self.held[n] + self._in_flight(n - 1)
        window, self.backward = 0.0, [0.0] * n
        for j in range(n):  # window over blocks max(0, j - prefetch) .. j
            window += options[j].reload - (options[j - 1 - prefetch].reload if j - 1 - prefetch >= 0 else 0.0)
            self.backward[j] = self.held[j + 1] + window + options[j].rerun
        self.window = [self.backward[j] - self.held[j + 1] - options[j].rerun for j in range(n)]
        self.prefix_f, self.prefix_b = _running_max(self.forward), _running_max(self.backward)
        self.suffix_f = _running_max(self.forward[::-1])[::-1] + [float("-inf")]
        self.suffix_b = _running_max(self.backward[::-1])[::-1] + [float("-inf")]
        self.peak = max([0.0, self.end, *self.forward, *self.backward])

    def _in_flight(self, j: int) -> float:
        return self.options[j].reload if self.overlap and j >= 0 else 0.0

    def with_option(self, m: int, o: Option) -> float:
        old, n, p = self.options[m], len(self.options), self.prefetch
        d_res, d_rel = o.resident - old.resident, o.reload - old.reload
        peak = max(0.0, self.prefix_f[m - 1] if m else 0.0, self.prefix_b[m - 1] if m else 0.0,
                   self.held[m] + o.working + self._in_flight(m - 1),
                   self.end + d_res + (d_rel if self.overlap and m == n - 1 else 0.0),
                   self.held[m + 1] + d_res + self.window[m] + d_rel + o.rerun,
                   self.suffix_b[m + p + 1] + d_res if m + p + 1 < n else 0.0)
        if m + 1 < n:
            peak = max(peak, self.held[m + 1] + d_res + self.options[m + 1].working + (o.reload if self.overlap else 0.0),
                       self.suffix_f[m + 2] + d_res)
        for j in range(m + 1, min(n, m + p + 1)):
            peak = max(peak, self.backward[j] + d_res + d_rel)
        return peak


def _running_max(values: list[float]) -> list[float]:
    out, best = [], float("-inf")
    for v in values:
        best = max(best, v)
        out.append(best)
    return out


def _search(choices: list[list[Option]], budget: float, prefetch: int, time_matters: bool, overlap: bool
            ) -> list[Option]:
    current = [c[0] for c in choices]  # keep everything
    peaks = _Peaks(current, prefetch, overlap)
    while peaks.peak > budget:
        best, best_score = None, 0.0
        for j, opts in enumerate(choices):
            for o in opts:
                if o is current[j]:
                    continue
                gain = peaks.peak - peaks.with_option(j, o)
                if gain <= 0:
                    continue
                cost = o.extra_s - current[j].extra_s
                score = gain / max(cost, 1e-12) if time_matters else gain
                if score > best_score:
                    best, best_score = (j, o), score
        if best is None:
            break
        current[best[0]] = best[1]
        peaks = _Peaks(current, prefetch, overlap)
    if time_matters and peaks.peak <= budget:  # the greedy can overshoot: undo what the budget does not need
        improved = True
        while improved:
            improved = False
            for j, opts in enumerate(choices):
                for o in sorted(opts, key=lambda o: o.extra_s):
                    if o.extra_s >= current[j].extra_s:
                        break
                    if peaks.with_option(j, o) <= budget:
                        current[j], improved = o, True
                        peaks = _Peaks(current, prefetch, overlap)
                        break
    return current


def _of_kind(options: list[Option], kind: str) -> Option:
    return next((o for o in options if o.policy.kind == kind), options[0])


def _of_fraction(options: list[Option], fraction: float) -> Option:
    return next((o for o in options if o.policy.kind == "split" and o.policy.fraction == fraction),
                _of_kind(options, "swap"))


def _descend(choices: list[list[Option]], start: list[Option], prefetch: int, overlap: bool) -> list[Option]:
    """From ``start``, move one block at a time to its option of least peak, until no move lowers the peak."""
    current = list(start)
    peaks = _Peaks(current, prefetch, overlap)
    improved = True
    while improved:
        improved = False
        for j, opts in enumerate(choices):
            for o in opts:
                if peaks.with_option(j, o) < peaks.peak:
                    current[j], improved = o, True
                    peaks = _Peaks(current, prefetch, overlap)
    return current


def _smallest(choices: list[list[Option]], prefetch: int, overlap: bool) -> tuple[float, list[Option]]:
    """The least peak the planner can reach, and the plan that reaches it (searched by peak alone): the uniform
    plans (every block kept, swapped, recomputed, split at one fraction), descents from the best of them and from
    keeping everything, and the greedy from keeping everything."""
    uniform = [[_of_kind(c, kind) for c in choices] for kind in ("keep", "swap", "recompute")]
    uniform += [[_of_fraction(c, a) for c in choices] for a in SPLIT_FRACTIONS]
    best_uniform = min(uniform, key=lambda c: simulate_peak(c, prefetch, overlap))
    candidates = [*uniform, _descend(choices, best_uniform, prefetch, overlap),
                  _descend(choices, uniform[0], prefetch, overlap), _search(choices, 0, prefetch, False, overlap)]
    return min(((simulate_peak(c, prefetch, overlap), c) for c in candidates), key=lambda pc: pc[0])


def _peak_choices(profile: Profile, configured: list[BlockPolicy | None]) -> list[list[Option]]:
    """Every block's options at the fixed split fractions: the peaks depend on bytes alone (no timing), so the
    warm-up forward's bytes give the same smallest reachable budget as the profiled step's."""
    bw = (1e9, 1e9)
    return [configured_options(profile.blocks, j, bw, False, configured[j]) for j in range(len(profile.blocks))]


class UnreachableBudget(ConfigError):
    """activations.memory_budget is below what any plan reaches; ``smallest`` is the least that is reached."""

    def __init__(self, budget: int, smallest: float, pinned: bool = False) -> None:
        self.smallest = int(smallest) + 1 if smallest > int(smallest) else int(smallest)
        also = ", free blocks that activations.blocks sets" if pinned else ""
        super().__init__(
            f"activations.memory_budget={budget} bytes ({format_bytes(budget)}) cannot be reached: the smallest budget any "
            f"plan reaches for these blocks{' with the policies activations.blocks sets' if pinned else ''} is "
            f"{self.smallest} bytes ({format_bytes(self.smallest)}); set activations.memory_budget to at least "
            f"{self.smallest} bytes{also}, or shorten the sequence / micro-batch")


def check_budget(profile: Profile, config: ActivationsConfig, device: torch.device,
                 configured: list[BlockPolicy | None]) -> None:
    """Raise ConfigError naming the smallest reachable budget if ``config.memory_budget`` is below it."""
    budget = int(config.memory_budget or 0)
    smallest, _ = _smallest(_peak_choices(profile, configured), config.prefetch_blocks, device.type == "cuda")
    if smallest > budget:
        raise UnreachableBudget(budget, smallest, any(c is not None for c in configured))


def _plan(chosen: list[Option], profile: Profile, budget: int, peak: float, bw: tuple[float, float],
          pinned: set[int]) -> Plan:
    blocks = profile.blocks
    base = sum(max(b.forward_s - b.move_s, 0.0) * 3 for b in blocks)  # forward + ~2x in backward
    rows = []
    for j, (o, b) in enumerate(zip(chosen, blocks)):
        rows.append({"block": j, "policy": str(o.policy) + (" *" if j in pinned else ""), "kept": int(o.resident),
                     "moved": int(o.reload), "forward_s": max(b.forward_s - b.move_s, 0.0), "extra_s": o.extra_s})
    return Plan([o.policy for o in chosen], chosen, profile, budget, int(peak),
                base + sum(o.extra_s for o in chosen), bw, rows, bool(pinned))


def make_plan(profile: Profile, config: ActivationsConfig, device: torch.device,
              probe: Callable[[int], tuple[float, float]], configured: list[BlockPolicy | None],
              pinned: set[int] = frozenset()) -> Plan:
    """auto: the plan of least predicted step time whose peak fits ``memory_budget``; blocks that are not None in
    ``configured`` (set by ``activations.blocks``) keep their policy."""
    blocks = profile.blocks
    largest = max((b.saved_bytes for b in blocks), default=0)
    bw = probe(max(largest, 1 << 20))
    overlap = device.type == "cuda"
    choices = [configured_options(blocks, j, bw, overlap, configured[j]) for j in range(len(blocks))]
    budget = int(config.memory_budget or 0)
    chosen = _search(choices, budget, config.prefetch_blocks, True, overlap)
    peak = simulate_peak(chosen, config.prefetch_blocks, overlap)
    if peak > budget:  # the time-driven search missed: the plan of least peak, the one check_budget found (the
        # options' bytes, and so the search by peak, are the same as there; only their times differ)
        peak, chosen = _smallest(choices, config.prefetch_blocks, overlap)
        if peak > budget:
            raise UnreachableBudget(budget, peak, bool(pinned))
    return _plan(chosen, profile, budget, peak, bw, pinned)


def measure_bandwidth(tier: str, device: torch.device, nbytes: int, folder: Any = None,
                      engine: Any = None) -> tuple[float, float]:
    """Bytes/s out of and back into ``device`` through ``tier`` (best of 3 on a buffer of ~``nbytes``; the NVMe
    tier through ``engine``, the swap engine the activations use)."""
    from memtrain.swap import aligned_empty

    n = max(1 << 20, min(int(nbytes), 64 << 20)) // 4096 * 4096
    cuda = device.type == "cuda"
    src = torch.ones(n, dtype=torch.uint8, device=device)
    host = aligned_empty(n, pin=cuda)

    def best(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-9)

    out_s = best(lambda: host.copy_(src, non_blocking=cuda))
    in_s = best(lambda: src.copy_(host, non_blocking=cuda))
    if tier == "nvme":
        if engine is None:
            from memtrain.swap import SwapEngine

            engine = SwapEngine()
        path = folder.file("bandwidth-probe.bin") if folder is not None else os.path.join(tempfile.gettempdir(),
                                                                                         f"memtrain-probe-{os.getpid()}")
        try:
            out_s += best(lambda: engine.write(host, path).wait())
            in_s += best(lambda: engine.read(host, path).wait())
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
    return n / out_s, n / in_s


def predict_peak(profile: Profile, policies: list[BlockPolicy], prefetch_blocks: int, overlap: bool = False) -> int:
    """The peak the cost model predicts for given per-block policies (what a plan's test checks against)."""
    bw = (1e9, 1e9)  # the peak does not depend on bandwidth
    options = []
    for j, policy in enumerate(policies):
        opts = block_options(profile.blocks, j, bw, False, policy.fraction if policy.kind == "split" else None)
        options.append(next(o for o in opts if o.policy.kind == policy.kind))
    return int(simulate_peak(options, prefetch_blocks, overlap))


def choose_split_fractions(profile: Profile, config: ActivationsConfig, device: torch.device,
                           probe: Callable[[int], tuple[float, float]], configured: list[BlockPolicy | None],
                           pinned: set[int] = frozenset()) -> Plan:
    """Split without a fraction: per such block, the split whose predicted extra time is least. With copies that
    overlap compute (CUDA), that is MEMO's choice: the most tokens whose transfer still hides behind the
    neighbouring blocks' compute; the rest is recomputed. The other blocks keep their configured policy."""
    blocks = profile.blocks
    bw = probe(max(max((b.saved_bytes for b in blocks), default=0), 1 << 20))
    overlap = device.type == "cuda"
    chosen = []
    for j in range(len(blocks)):
        opts = configured_options(blocks, j, bw, overlap, configured[j])
        chosen.append(min(opts, key=lambda o: (o.extra_s, -(o.policy.fraction or 0.0))))
    peak = int(simulate_peak(chosen, config.prefetch_blocks, overlap))
    return _plan(chosen, profile, peak, peak, bw, pinned)
