"""The keeper: one process per node that owns the snapshot memory, so a crashed trainer leaves its snapshot behind.

Segments are anonymous shared memory (memfd, mode 0600) that the keeper creates and hands to trainers as file
descriptors over a Unix socket (SCM_RIGHTS). The socket lives in a 0700 folder named by user, and the keeper
answers only peers whose uid (SO_PEERCRED) is its own. It is named by job and node, so two jobs (or two
simulated nodes of one test) never share one. It runs in its own session: torchrun's restart of the workers,
or a SIGKILL of a trainer, does not reach it. It exits when no trainer is attached and it holds nothing (the
job finished and let go of its snapshots), or after ``idle_timeout`` seconds with no trainer attached;
if it dies its memory goes with it, and the next keeper starts empty (the next snapshot refills it).

    python memtrain/checkpoint/keeper.py --socket PATH --idle-timeout SECONDS   (started by KeeperClient; run as
    a file, not a module, so it imports neither torch nor memtrain)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import mmap
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MAX_MESSAGE = 1 << 16
_EMPTY_GRACE_S = 5.0  # a keeper holding nothing waits this long for a trainer to attach before it exits
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def default_keeper_dir() -> Path:
    return Path(f"/tmp/memtrain-{os.getuid()}")


_MAX_SOCKET_PATH = 100  # bytes; Unix socket addresses hold 108, and the keeper binds a temporary name first


def socket_path(keeper_dir: str | Path | None, job: str, node: int) -> Path:
    folder = Path(keeper_dir or default_keeper_dir())
    path = folder / f"{job}-node{node}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:  # long job ids (torchrun's uuids) under a deep folder
        path = folder / f"{hashlib.sha1(job.encode()).hexdigest()[:12]}-node{node}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ValueError(f"checkpoint.keeper_dir={str(folder)!r} is too long for a Unix socket path (the socket "
                         f"would be {path}); choose a shorter folder")
    return path


def peer_uid(conn: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def peer_pid(conn: socket.socket) -> int:
    pid, _, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid


class Keeper:
    """The server: a single-threaded loop over the listening socket and the attached trainers."""

    def __init__(self, path: Path, idle_timeout: float) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.segments: dict[str, tuple[int, int]] = {}  # name -> (memfd, size)
        self.claims: dict[int, socket.socket] = {}  # rank -> the trainer attached as that rank
        self.selector = selectors.DefaultSelector()
        self.clients: set[socket.socket] = set()

    def serve(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f".{os.getpid()}.tmp")
        server.bind(str(tmp))
        os.chmod(tmp, 0o600)
        server.listen(64)
        os.replace(tmp, self.path)  # appears only once it accepts connections
        inode = os.stat(self.path).st_ino
        self.selector.register(server, selectors.EVENT_READ)
        idle_since = time.monotonic()
        try:
            while True:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.fileobj is server:
                        self._accept(server)
                    elif not self._answer(key.fileobj):  # type: ignore[arg-type]
                        return
                if self.clients:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > (self.idle_timeout if self.segments else _EMPTY_GRACE_S):
                    return  # nobody came back for what it holds, or it holds nothing (the job finished)
        finally:
            if self.path.exists() and os.stat(self.path).st_ino == inode:  # not a successor's socket
                self.path.unlink()
            server.close()

    def _accept(self, server: socket.socket) -> None:
        conn, _ = server.accept()
        if peer_uid(conn) != os.getuid():  # only the job's own user may read or write its snapshots
            conn.close()
            return
        self.clients.add(conn)
        self.selector.register(conn, selectors.EVENT_READ)

    def _drop_client(self, conn: socket.socket) -> None:
        self.claims = {rank: c for rank, c in self.claims.items() if c is not conn}
        self.selector.unregister(conn)
        self.clients.discard(conn)
        conn.close()

    def _answer(self, conn: socket.socket) -> bool:
        """Serve one request; False when asked to shut down."""
        try:
            data = conn.recv(_MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:
            self._drop_client(conn)
            return True
        try:
            request = json.loads(data)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            socket.send_fds(conn, [json.dumps({"error": "malformed request"}).encode()], [])
            return True
        fds: list[int] = []
        if op == "open":  # get, or create with this size (a segment of another size is replaced)
            name, size = request["name"], int(request["size"])
            fd_size = self.segments.get(name)
            created = fd_size is None or fd_size[1] != size
            if created:
                if fd_size is not None:
                    os.close(fd_size[0])
                fd = os.memfd_create(f"memtrain-{name}", os.MFD_CLOEXEC)
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, size)
                self.segments[name] = (fd, size)
            fds = [self.segments[name][0]]
            reply: dict[str, Any] = {"created": created, "size": size}
        elif op == "get":
            fd_size = self.segments.get(request["name"])
            reply = {"size": None if fd_size is None else fd_size[1]}
            fds = [] if fd_size is None else [fd_size[0]]
        elif op == "list":
            prefix = request.get("prefix", "")
            reply = {"segments": {n: s for n, (_, s) in self.segments.items() if n.startswith(prefix)}}
        elif op == "drop":
            prefix = request["prefix"]
            for name in [n for n in self.segments if n.startswith(prefix)]:
                os.close(self.segments.pop(name)[0])
            reply = {}
        elif op == "claim":  # one live trainer per rank: two runs under one job name would mix snapshots
            rank = int(request["rank"])
            holder = self.claims.get(rank)
            if holder is not None and holder is not conn and _closed(holder):  # it left; its EOF is not read yet
                self._drop_client(holder)
                holder = None
            if holder is not None and holder is not conn:
                reply = {"error": f"another trainer (pid {peer_pid(holder)}) is attached to this keeper as rank "
                                  f"{rank}: two runs share the job name; give each its own "
                                  "(checkpoint.job_name, or the launcher's job id)"}
            else:
                self.claims[rank] = conn
                reply = {}
        elif op == "ping":
            reply = {"pid": os.getpid(), "segments": len(self.segments)}
        elif op == "shutdown":
            conn.sendall(json.dumps({}).encode())
            return False
        else:
            reply = {"error": f"unknown op {op!r}"}
        socket.send_fds(conn, [json.dumps(reply).encode()], fds)
        return True


class KeeperClient:
    """A trainer's connection to its node's keeper; starts the keeper when none answers."""

    def __init__(self, path: Path, idle_timeout: float, start: bool = True) -> None:
        self.path = Path(path)
        self.idle_timeout = idle_timeout
        self.sock = self._connect() if not start else self._connect_or_start()

    def alive(self) -> bool:
        """False when the keeper closed our connection (it died): checked without waiting."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._connect_or_start()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        return sock

    def _connect_or_start(self) -> socket.socket:
        try:
            return self._connect()
        except OSError:
            pass
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        # One starter per node: the others wait on the lock, then find the keeper answering.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._connect()
            except OSError:
                pass
            with open(self.path.with_suffix(".log"), "ab") as log:
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--socket", str(self.path),
                     "--idle-timeout", str(self.idle_timeout)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    close_fds=True,
                )
            deadline = time.monotonic() + 60.0
            while True:
                try:
                    return self._connect()
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the checkpoint keeper did not start; see {self.path.with_suffix('.log')}")
                    time.sleep(0.02)

    def _request(self, **request: Any) -> tuple[dict[str, Any], list[int]]:
        self.sock.sendall(json.dumps(request).encode())
        data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 1)
        if not data:
            raise ConnectionError(f"the checkpoint keeper at {self.path} closed the connection")
        reply = json.loads(data)
        if "error" in reply:
            raise RuntimeError(f"checkpoint keeper: {reply['error']}")
        return reply, fds

    def open(self, name: str, size: int) -> tuple[mmap.mmap, bool]:
        """A shared mapping of segment ``name`` of ``size`` bytes; True when it was created (empty)."""
        reply, fds = self._request(op="open", name=name, size=size)
        return _map(fds[0], size), reply["created"]

    def get(self, name: str) -> mmap.mmap | None:
        reply, fds = self._request(op="get", name=name)
        return None if reply["size"] is None else _map(fds[0], reply["size"])

    def list(self, prefix: str = "") -> dict[str, int]:
        return self._request(op="list", prefix=prefix)[0]["segments"]

    def claim(self, rank: int) -> None:
        """Attach as ``rank``; refused (RuntimeError) while another live trainer is attached as that rank."""
        self._request(op="claim", rank=rank)

    def drop(self, prefix: str) -> None:
        self._request(op="drop", prefix=prefix)

    def ping(self) -> dict[str, Any]:
        return self._request(op="ping")[0]

    def shutdown(self) -> None:
        self.sock.sendall(json.dumps({"op": "shutdown"}).encode())
        self.sock.recv(_MAX_MESSAGE)

    def close(self) -> None:
        self.sock.close()


def _closed(conn: socket.socket) -> bool:
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _map(fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory; the keeper keeps its own descriptor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    args = parser.parse_args()
    Keeper(args.socket, args.idle_timeout).serve()


if __name__ == "__main__":
    main()
