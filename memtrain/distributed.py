"""Starting the default process group so that it also works after torchrun restarts the workers; ending a worker.

Under torchrun the workers meet in the agent's store, and that store outlives a restart of the workers
(torch 2.13, c10d rendezvous): the restarted ranks can read the addresses the killed ranks had published and
fail with "Gloo connectFullMesh failed ... Connection refused". Each restarted attempt meets under its own prefix.
Outside torchrun this is torch.distributed.init_process_group unchanged.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def restartable_by_torchelastic() -> bool:
    """A restarted attempt under torchrun with the agent's store (the case this module guards); the first
    attempt has no stale keys and starts the default way."""
    env = os.environ
    return env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def init_process_group(backend: str, timeout: timedelta | None = None) -> None:
    env = os.environ
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    if not restartable_by_torchelastic():
        dist.init_process_group(backend, timeout=timeout)
        return
    world = int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout or default_pg_timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"memtrain/attempt_{attempt}", store),
                            rank=int(env["RANK"]), world_size=world, timeout=timeout)


def exit_worker(code: int = 0) -> NoReturn:
    """End a distributed worker process without Python's interpreter teardown; call it last.

    With torch 2.13, process groups that DTensor used stay referenced from its caches after
    ``destroy_process_group()``, so their gloo threads outlive it. A tensor those threads release while the
    interpreter finalizes takes the GIL, which aborts the process there (SIGABRT, "terminate called without an
    active exception"; pytorch/pytorch#190489) and fails a run that had finished. Output is flushed first;
    files already written are the kernel's to keep.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
