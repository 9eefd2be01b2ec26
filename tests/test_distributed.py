"""One process per module: real processes, a real gloo process group, against the single-process engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, mlp

from replay_opt import ReplayModelWrapper, ReplayOptimizer

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
SPLITS = {1: [], 2: ["6"], 3: ["4", "8"], 4: ["2", "6", "8"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks the way torchrun does (environment variables), wait for all of them."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def single_process(k: int, replicas: int, steps: int, method: str = "fr") -> tuple[torch.nn.Module, list[float]]:
    """The same training in one process: batch t of the D replicas concatenated (no BatchNorm, so equal)."""
    torch.manual_seed(0)
    model = mlp(depth=6)
    wrapper = ReplayModelWrapper(model, split_points=SPLITS[k] or None, num_modules=k, method=method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), wrapper)
    data = batches(steps * replicas, last=5)
    losses = []
    for t in range(steps):
        parts = data[t * replicas : (t + 1) * replicas]
        # Each replica's loss is the mean over its shard; the replicas average them.
        out = wrapper(torch.cat([p[0] for p in parts]))
        loss = sum(F.cross_entropy(out[i : i + len(p[1])], p[1]) for i, p in zip(_offsets(parts), parts))
        loss = loss / replicas
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def _offsets(parts):
    out, o = [], 0
    for p in parts:
        out.append(o)
        o += len(p[1])
    return out


def assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    expected = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert expected.keys() == state.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize(("world", "k", "method"), [(2, 2, "fr"), (4, 2, "fr"), (3, 3, "ddg"), (2, 1, "dni")])
def test_matches_the_single_process_engine(tmp_path, world, k, method):
    steps = 8
    results = launch(world, "--modules", str(k), "--method", method, "--steps", str(steps), "--out", str(tmp_path))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline layout" in results[0].stdout
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    reference, losses = single_process(k, world // k, steps, method)
    assert_same(reference, final["model"])
    assert final["losses"] == pytest.approx(losses, abs=1e-5)  # the last module's loss, on rank 0


def test_checkpoint_and_resume_across_processes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = launch(4, "--modules", "2", "--steps", "9", "--out", str(tmp_path / "a"))
    assert all(r.returncode == 0 for r in straight), straight[0].stderr[-3000:]
    first = launch(4, "--modules", "2", "--steps", "9", "--save-at", "4", "--out", str(tmp_path / "b"))
    assert all(r.returncode == 0 for r in first), first[0].stderr[-3000:]
    resumed = launch(4, "--modules", "2", "--steps", "9", "--resume", str(tmp_path / "b" / "checkpoint.pt"),
                     "--out", str(tmp_path / "b"))  # fmt: skip
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-3000:]
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_killed_rank_stops_the_others_with_a_clear_error(tmp_path):
    start = time.monotonic()
    results = launch(3, "--modules", "3", "--steps", "50", "--die-rank", "1", "--die-at", "3", "--timeout", "15",
                     "--out", str(tmp_path), timeout=120)  # fmt: skip
    elapsed = time.monotonic() - start
    assert results[1].returncode == -9
    for r in (results[0], results[2]):
        assert r.returncode != 0
        # A PipelineError that names this rank, what it was doing, and (for a message) the dead peer.
        assert "PipelineError" in r.stderr and ("has failed or exited" in r.stderr or "gave up after" in r.stderr), (
            r.stderr[-2000:]
        )
    assert elapsed < 60


def test_world_size_not_divisible_is_a_clear_error(tmp_path):
    results = launch(3, "--modules", "2", "--out", str(tmp_path), timeout=60)
    assert all(r.returncode != 0 for r in results)
    assert "not divisible by num_modules=2" in results[0].stderr
