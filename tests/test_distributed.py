"""One process per module: real processes, a real gloo process group, against the single-process engine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cluster import Cluster, TaskFailed, free_port
from conftest import batches, mlp

from replay_opt import ReplayModelWrapper, ReplayOptimizer

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
SPLITS = {1: [], 2: ["6"], 3: ["4", "8"], 4: ["2", "6", "8"]}


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
    """The same training in one process: batch t of the D replicas concatenated (no BatchNorm, so equal).
    For ``bp``, ``gpipe`` and ``1f1b``, plain autograd on the unwrapped model: naive model parallelism and exact
    micro-batched pipelining must be exactly backprop."""
    torch.manual_seed(0)
    model = mlp(depth=6)
    if method in ("bp", "gpipe", "1f1b"):
        wrapper, opt = model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
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
    expected = dict(model.state_dict())  # the wrapper's state dict has the model's own keys
    assert expected.keys() == state.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def clusters():
    started: dict[int, Cluster] = {}

    def get(world: int) -> Cluster:
        if world not in started:
            started[world] = Cluster(world)
        return started[world]

    yield get
    for c in started.values():
        c.close()


@pytest.mark.parametrize(
    ("world", "k", "method"),
    [(2, 2, "fr"), pytest.param(4, 2, "fr", marks=pytest.mark.slow), pytest.param(4, 4, "ddg", marks=pytest.mark.slow),
     (2, 1, "dni"), (2, 2, "bp"), pytest.param(4, 2, "bp", marks=pytest.mark.slow), (2, 2, "gpipe"), (2, 2, "1f1b"),
     pytest.param(4, 2, "1f1b", marks=pytest.mark.slow)],
)  # fmt: skip
def test_matches_the_single_process_engine(clusters, world, k, method):
    steps = 8
    ranks = clusters(world).run("dist_worker:train", modules=k, method=method, steps=steps)
    reference, losses = single_process(k, world // k, steps, method)
    for rank in ranks:  # every rank's state dict holds every module's trained weights
        assert_same(reference, rank["model"])
    assert ranks[0]["losses"] == pytest.approx(losses, abs=1e-5)  # the last module's loss, on rank 0


@pytest.mark.parametrize(("method", "m"), [("gpipe", 4), ("1f1b", 2)])
def test_microbatched_pipelines_equal_autograd_over_microbatches(clusters, method, m):
    """BatchNorm normalizes each micro-batch by itself and its running statistics move once per micro-batch,
    dropout draws its masks micro-batch after micro-batch: the reference is plain autograd on the unwrapped
    model fed the micro-batches one after the other (the loss on their concatenated outputs).  Equal weights,
    buffers and all, mean that the schedule's training pass replays the forward the user's loss saw."""
    from dist_worker import bn_dropout_mlp

    ranks = clusters(2).run("dist_worker:train_microbatched_bn", method=method, microbatches=m, steps=4)
    torch.manual_seed(0)
    model = bn_dropout_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(4):
        out = torch.cat([model(part) for part in torch.tensor_split(x, m)])
        F.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
    for rank in ranks:
        assert_same(model, rank["model"])


@pytest.mark.parametrize(("method", "in_model"), [("gpipe", True), ("1f1b", False)])
def test_microbatched_pipelines_train_a_transformers_model_exactly(clusters, method, in_model):
    """GPT-2 (torch.export graph; tied embedding and head on two ranks; a new sequence length every step; sizes
    crossing the cut): against plain autograd, with the loss the model computes from ``labels`` (a scalar:
    the micro-batches' mean) or the user's loss on the logits."""
    from dist_worker import without_dropout
    from zoo import ZOO, call, loss_of

    ranks = clusters(2).run("dist_worker:train_zoo", name="gpt2", method=method, steps=3, in_model=in_model)
    torch.manual_seed(0)
    entry = ZOO["gpt2"]
    model = without_dropout(entry.build())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        data = entry.batch(4, t)
        loss_of(entry, call(model, data, with_labels=in_model, entry=entry), data, in_model).backward()
        opt.step()
        opt.zero_grad()
    for rank in ranks:
        assert_same(model, rank["model"])


@pytest.mark.slow
def test_checkpoint_and_resume_across_processes(clusters, tmp_path):
    cluster = clusters(4)
    straight = cluster.run("dist_worker:train", modules=2, steps=9)
    cluster.run("dist_worker:train", modules=2, steps=9, save_at=4, out=tmp_path)
    resumed = cluster.run("dist_worker:train", modules=2, steps=9, resume=tmp_path / "checkpoint.pt")
    a, b = straight[0]["model"], resumed[0]["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_with_a_clear_error(tmp_path):
    start = time.monotonic()
    results = launch(3, "--modules", "3", "--steps", "50", "--die-rank", "1", "--die-at", "3", "--timeout", "8",
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


@pytest.mark.slow
def test_world_size_not_divisible_is_a_clear_error(clusters):
    with pytest.raises(TaskFailed, match="not divisible by num_modules=3"):
        clusters(4).run("dist_worker:train", modules=3)


def test_tied_weights_across_processes_equal_one_process(clusters):
    """W shared by module 1 (embedding, rank 1) and module 2 (head, rank 0): both copies get the sum of both
    modules' gradients and stay identical, as in one process (itself checked against a hand-written reference)."""
    from test_models import TiedLM

    ranks = clusters(2).run("dist_worker:train_tied", steps=6)
    torch.manual_seed(0)
    model = TiedLM()
    wrapper = ReplayModelWrapper(model, split_points=["mlp"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.5, momentum=0.9), wrapper)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randint(0, 12, (5,), generator=g), torch.randint(0, 12, (5,), generator=g)
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    for rank in ranks:
        torch.testing.assert_close(rank["embed"], model.embed.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(rank["head"], model.embed.weight, rtol=0, atol=1e-6)
        assert rank["tied_once"], "the gathered state dict keeps tied weights one tensor"
    assert_same(model, ranks[0]["model"], atol=1e-6)
