"""One reduction at a time on a background thread (and, on CUDA, its own stream), with timestamps.

The thread only ever reads the buffer it was handed (a snapshot, not the live parameters), so the local
steps that run meanwhile cannot change what is averaged, and the average cannot overwrite their progress.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class RoundTiming:
    launched: float  # time.perf_counter() on the training thread
    started: float = 0.0  # the collective began (background thread)
    finished: float = 0.0  # the result is ready
    waited: float = 0.0  # seconds the training thread blocked for it

    @property
    def reduce_seconds(self) -> float:
        return self.finished - self.started

    @property
    def hidden_seconds(self) -> float:
        return max(0.0, self.finished - self.launched - self.waited)


class BackgroundReduce:
    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.reduce = reduce
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._jobs: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None
        self.timing: RoundTiming | None = None
        self.history: list[RoundTiming] = []
        self._thread = threading.Thread(target=self._run, name="memtrain-local-update-reduce", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> bool:
        return self.timing is not None

    def launch(self, snapshot: torch.Tensor) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the local-update reduction thread was closed")
        if self.in_flight:
            raise RuntimeError("a reduction is already in flight: wait() for it first")
        ready = None
        if self.cuda:  # the snapshot was written on the training stream: the reduction stream waits for it
            ready = torch.cuda.Event()
            ready.record()
        self.timing = RoundTiming(launched=time.perf_counter())
        self._done.clear()
        self._jobs.put((snapshot, ready))

    def wait(self) -> torch.Tensor:
        if self.timing is None:
            raise RuntimeError("no reduction in flight")
        t0 = time.perf_counter()
        self._done.wait()
        timing, self.timing = self.timing, None
        timing.waited = time.perf_counter() - t0
        self.history.append(timing)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("the background all-reduce of the local-update round failed") from error
        result, self._result = self._result, None
        assert result is not None
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.stream)
            # Allocated on the reduction stream, read and freed on the training stream. Unrecorded, its block goes
            # back to the reduction stream's pool when freed, and the round launched at the same boundary (which
            # waits only for an event recorded before the outer step) may take it while the outer step reads it.
            if result.is_cuda:
                result.record_stream(torch.cuda.current_stream())
        return result

    def close(self) -> None:
        """Stop the thread once its current job (if any) is done; the caller waits for results first."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        if self.cuda:  # a new thread starts on device 0: the reduction's allocations belong on the training device
            torch.cuda.set_device(self.stream.device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            snapshot, ready = job
            timing = self.timing
            try:
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        self.stream.wait_event(ready)
                        timing.started = time.perf_counter()
                        self._result = self.reduce(snapshot)
                        self.stream.synchronize()
                else:
                    timing.started = time.perf_counter()
                    self._result = self.reduce(snapshot)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e
            timing.finished = time.perf_counter()
            self._done.set()
