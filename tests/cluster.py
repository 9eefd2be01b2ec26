"""Real processes joined by a real gloo process group, kept across tests.

Starting W Python processes that import torch and accelerate costs seconds each; most
multi-process tests only need *a* fresh training run inside already-running processes.  A
``Cluster`` starts W workers the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, ...), and
``run(function, **kwargs)`` calls ``function(**kwargs)`` on every rank and returns every rank's
result.  A task that raises on any rank ends the workers (the process group is then in an
unknown state) and ``run`` raises ``TaskFailed`` with every rank's error; the next ``run``
starts fresh workers.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class TaskFailed(Exception):
    def __init__(self, errors: dict[int, str], results: dict[int, Any]) -> None:
        super().__init__("\n\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
        self.errors = errors
        self.results = results


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Any = None


class Cluster:
    def __init__(self, world: int, env: dict[str, str] | None = None) -> None:
        self.world = world
        self.env = env or {}
        self.workers: list[_Worker] = []

    def start(self) -> None:
        self.close()
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        port = free_port()
        self.workers = []
        for rank in range(self.world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.world),
                   "LOCAL_WORLD_SIZE": str(self.world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "CLUSTER_ADDRESS": f"{listener.address[0]}:{listener.address[1]}",
                   "CLUSTER_KEY": key.hex(), "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
                   **self.env}  # fmt: skip
            proc = subprocess.Popen([sys.executable, str(HERE / "cluster_worker.py")], env=env, stdout=sys.stderr)
            self.workers.append(_Worker(proc))
        conns = {}
        listener._listener._socket.settimeout(120)
        while len(conns) < self.world:
            conn = listener.accept()
            conns[conn.recv()] = conn
        listener.close()
        for rank, worker in enumerate(self.workers):
            worker.conn = conns[rank]

    def run(self, function: str, limit: float = 180, **kwargs: Any) -> list[Any]:
        """``function`` is "module:name" (a module on tests/' path); its result on every rank."""
        if not self.workers or any(w.process.poll() is not None for w in self.workers):
            self.start()
        for worker in self.workers:
            worker.conn.send((function, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + limit
        while len(results) + len(errors) < self.world:
            for rank, worker in enumerate(self.workers):
                if rank in results or rank in errors:
                    continue
                if worker.conn.poll(0.05):
                    try:
                        status, value = pickle.loads(worker.conn.recv_bytes())
                    except (EOFError, OSError):
                        status, value = "error", f"(process ended with code {worker.process.poll()})"
                    (results if status == "ok" else errors)[rank] = value
                    if status != "ok":  # the others are left waiting on it: let them report, briefly
                        deadline = min(deadline, time.monotonic() + 2)
                elif worker.process.poll() is not None:
                    errors[rank] = f"(process ended with code {worker.process.returncode})"
            if time.monotonic() > deadline and len(results) + len(errors) < self.world:
                for w in self.workers:  # stacks of whoever still runs, on stderr
                    w.process.send_signal(signal.SIGUSR1)
                time.sleep(1)
                for rank in range(self.world):
                    if rank not in results and rank not in errors:
                        errors[rank] = "(no answer within the time given; stacks on stderr)"
        if errors:
            self.close(kill=True)
            raise TaskFailed(errors, results)
        return [results[r] for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):  # a worker that has already gone
                worker.conn.send(None)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=0.5 if kill else 10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.workers = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
