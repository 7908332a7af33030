"""The swap engine (memtrain._C): bytes written come back bitwise, through io_uring and the thread pool,
with and without O_DIRECT; failures name the file; host buffers are aligned, reused and within budget."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memtrain import _C
from memtrain.swap import HostBufferPool, SwapEngine, aligned_empty

BACKENDS = ["threads"] + (["io_uring"] if _C.io_uring_compiled() else [])


def _engine(backend: str, **kw) -> SwapEngine:
    try:
        return SwapEngine(backend=backend, **kw)
    except RuntimeError as err:  # a kernel or sandbox that forbids io_uring
        pytest.skip(str(err))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nbytes", [0, 1, 4096, 3 * 2**20 + 17, 8 * 2**20])
def test_roundtrip_is_bitwise(backend: str, nbytes: int, tmp_path: Path) -> None:
    engine = _engine(backend, block_size=2**20, queue_depth=4)
    for source in (aligned_empty(nbytes), torch.empty(nbytes, dtype=torch.uint8)):  # O_DIRECT-able, and maybe not
        source.random_(0, 256)
        engine.write(source, tmp_path / "swap").wait()
        back = aligned_empty(nbytes)
        engine.read(back, tmp_path / "swap").wait()
        assert torch.equal(back, source)
    assert engine.stats()["bytes_written"] == 2 * nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_requests_in_flight_at_offsets(backend: str, tmp_path: Path) -> None:
    engine = _engine(backend, block_size=2**16, queue_depth=16)
    tensors = [torch.randn(2**14 + i * 1000) for i in range(24)]  # fp32, assorted sizes
    slot = 2**18  # each tensor at its own aligned offset of one shared file
    pending = [engine.write(t, tmp_path / "shared", offset=i * slot) for i, t in enumerate(tensors)]
    for h in pending:
        h.wait()
    backs = [torch.empty_like(t) for t in tensors]
    pending = [engine.read(b, tmp_path / "shared", offset=i * slot) for i, b in enumerate(backs)]
    for h, t in zip(pending, tensors):
        assert torch.equal(h.wait(), t)
    if backend == "io_uring":  # the ring takes a whole batch at once; threads may happen to run one by one
        assert engine.stats()["max_blocks_in_flight"] > 1


def test_dropping_an_unwaited_handle_finishes_the_transfer(tmp_path: Path) -> None:
    engine = SwapEngine()
    data = torch.randn(2**20)
    engine.write(data.clone(), tmp_path / "dropped")  # handle and its tensor dropped at once
    assert torch.equal(engine.read(torch.empty_like(data), tmp_path / "dropped").wait(), data)


def test_tmpfs_without_o_direct_falls_back_to_buffered_io() -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    engine = SwapEngine()
    path = Path("/dev/shm") / f"memtrain-test-{os.getpid()}"
    try:
        data = aligned_empty(2**20).random_(0, 256)
        engine.write(data, path).wait()
        assert torch.equal(engine.read(aligned_empty(2**20), path).wait(), data)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_file(backend: str, tmp_path: Path) -> None:
    engine = _engine(backend)
    short = tmp_path / "short"
    engine.write(torch.zeros(100), short).wait()
    handle = engine.read(torch.zeros(10_000), short)
    for _ in range(2):  # a failed transfer stays failed: no second wait hands back the unfilled tensor
        with pytest.raises(RuntimeError, match=f"read of {short} failed .*unexpected end of file"):
            handle.wait()
    direct = aligned_empty(3 * 4096)
    engine.write(aligned_empty(4096), short).wait()  # one page on disk, three pages asked for through O_DIRECT
    with pytest.raises(RuntimeError, match="unexpected end of file"):
        engine.read(direct, short).wait()
    with pytest.raises(RuntimeError, match=f"cannot open {tmp_path / 'missing'} for reading"):
        engine.read(torch.zeros(10), tmp_path / "missing")
    with pytest.raises(RuntimeError, match="cannot open .*no_such_dir/f for writing"):
        engine.write(torch.zeros(10), tmp_path / "no_such_dir" / "f")


def test_engine_rejects_bad_settings_and_tensors() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4096"):
        SwapEngine(block_size=1000)
    with pytest.raises(ValueError, match="backend must be"):
        SwapEngine(backend="aio")
    with pytest.raises(ValueError, match="contiguous"):
        SwapEngine().write(torch.zeros(4, 4).t(), "/tmp/never-written")


def test_buffer_pool_is_aligned_reused_and_bounded() -> None:
    pool = HostBufferPool(buffer_bytes=10_000, count=2, pin=False)
    assert pool.buffer_bytes == 12_288 and pool.total_bytes == 2 * 12_288  # whole pages
    (i, a), (j, b) = pool.acquire(), pool.acquire()
    assert a.data_ptr() % 4096 == 0 and b.data_ptr() % 4096 == 0 and i != j
    with pytest.raises(TimeoutError, match="all 2 in use"):
        pool.acquire(timeout=0.05)
    pool.release(i)
    k, c = pool.acquire()
    assert k == i and c.data_ptr() == a.data_ptr()  # the same memory again, not a new allocation
    pool.release(k)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(k)
    with pytest.raises(ValueError, match="more than the host budget"):
        HostBufferPool(buffer_bytes=2**20, count=8, budget_bytes=4 * 2**20)


def test_swap_directory_is_per_run_checked_and_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from memtrain import ConfigError
    from memtrain.swap import SwapDirectory

    with SwapDirectory(tmp_path / "nvme", job="job1", required_bytes=2**20) as swap:
        assert swap.path.parent == tmp_path / "nvme" and swap.path.is_dir()
        SwapEngine().write(torch.zeros(1024), swap.file("tile0")).wait()
    assert not swap.path.exists()  # removed with its files

    # A run killed before it could clean up leaves a folder; the next run of the job removes it.
    script = ("import os; from memtrain.swap import SwapDirectory; d = SwapDirectory(r'%s', job='job1'); "
              "print(d.path, flush=True); os._exit(9)") % (tmp_path / "nvme")
    left = Path(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip())
    assert left.is_dir()
    fresh = SwapDirectory(tmp_path / "nvme", job="job1")
    assert fresh.removed_stale == [left] and not left.exists()
    other_job = SwapDirectory(tmp_path / "nvme", job="job2")
    assert fresh.path.exists()  # another job's start leaves live folders alone
    fresh.remove()
    other_job.remove()

    with pytest.raises(ConfigError, match=r"has .* GiB free, but the swap files need .* GiB"):
        SwapDirectory(tmp_path / "nvme", job="big", required_bytes=2**62)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        SwapDirectory(tmp_path / "a_file", job="j")
    with pytest.raises(ConfigError, match="cannot be created"):
        SwapDirectory(tmp_path / "a_file" / "below", job="j")


def test_memtrain_imports_without_the_native_engine_and_says_how_to_build_it() -> None:
    """A machine where ``memtrain._C`` is not built (the GPU check builds it there first): everything imports,
    the CPU activation tier works, and the first swap engine names the fix."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['memtrain._C'] = None\n"
        "import memtrain, memtrain.engine, memtrain.activations, memtrain.offload\n"
        "from memtrain.swap import SwapEngine\n"
        "try:\n    SwapEngine()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR memtrain._C, the native swap engine that the NVMe tiers use, is not built: run `pip install -e .`" \
        in out.stdout, out.stdout
