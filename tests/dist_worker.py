"""One rank of a multi-process training run, for tests/test_distributed.py.

``train`` runs in every process of a ``tests/cluster.py`` cluster (or, with ``main``, of W processes
started the way torchrun starts them).  It trains the deep MLP of the tests with one process per
module, D = W / K data-parallel replicas, replica d taking batch t*D + d at step t, and returns the
full trained state (collected from every rank) and the logged losses; optionally it writes a
checkpoint at ``save_at``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from conftest import batches, mlp  # noqa: E402

from replay_opt import ReplayModelWrapper, ReplayOptimizer  # noqa: E402

SPLITS = {1: [], 2: ["6"], 3: ["4", "8"], 4: ["2", "6", "8"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modules", type=int, required=True)
    p.add_argument("--method", default="fr")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--die-rank", type=int, default=None)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    train(args.modules, args.method, args.steps, args.out, die_rank=args.die_rank, die_at=args.die_at,
          timeout=args.timeout)  # fmt: skip
    dist.destroy_process_group()


def train(
    modules: int,
    method: str = "fr",
    steps: int = 8,
    out: Path | None = None,
    save_at: int | None = None,
    resume: Path | None = None,
    die_rank: int | None = None,
    die_at: int | None = None,
    timeout: float = 60,
    microbatches: int | None = None,
) -> dict:
    """One rank's training; returns the full trained state (collected from every rank) and the logged losses."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp(depth=6)
    # Under torchrun's environment with no process group yet, the wrapper starts one itself.
    wrapper = ReplayModelWrapper(
        model, split_points=SPLITS[modules] or None, num_modules=modules, method=method, timeout=timeout,
        microbatches=microbatches,
    )  # fmt: skip
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = world // modules
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), wrapper)
    start = 0
    if resume is not None:
        saved = torch.load(resume, weights_only=False)
        wrapper.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    data = batches(steps * replicas, last=5)  # the very last batch is smaller
    losses = []
    for t in range(start, steps):
        x, y = data[t * replicas + wrapper.layout.replica]
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(wrapper.sum_over_last_modules(loss.detach())) / replicas)
        if die_rank == rank and die_at == t:
            os.kill(os.getpid(), signal.SIGKILL)
        if save_at == t + 1:
            state = {"model": wrapper.state_dict(), "opt": opt.state_dict(), "step": t + 1}
            if rank == 0 and out is not None:
                torch.save(state, out / "checkpoint.pt")
            dist.barrier()
    state = wrapper.state_dict()
    wrapper.rank.close()
    return {"model": state, "losses": losses}


if __name__ == "__main__":
    main()


def train_tied(steps: int = 6, method: str = "fr") -> dict:
    """The tied embedding <-> head model of tests/test_models.py, K=2: module 1 and module 2 share W."""
    from test_models import TiedLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TiedLM()
    wrapper = ReplayModelWrapper(model, split_points=["mlp"], method=method, timeout=60)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.5, momentum=0.9), wrapper)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 12, (5,), generator=g), torch.randint(0, 12, (5,), generator=g)) for _ in range(steps)]
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    state = wrapper.state_dict()
    wrapper.rank.close()
    tied_once = state["embed.weight"] is state["head.weight"]  # as in one process: one tensor
    return {"model": state, "embed": model.embed.weight.detach().clone(), "head": model.head.weight.detach().clone(),
            "tied_once": tied_once}  # fmt: skip


def bn_dropout_mlp() -> torch.nn.Sequential:
    """BatchNorm in both modules (split at "3"), dropout in the last: rank 0's, so the random stream of the
    last module's rank is the only one drawn from, as in one process."""
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 4),
    )  # fmt: skip


def train_microbatched_bn(method: str, microbatches: int, steps: int = 4, checkpointing: bool = False) -> dict:
    """``bn_dropout_mlp`` under method='gpipe'/'1f1b' with 2 modules, with or without activation checkpointing; the
    full state at the end, and how often module 1's first layer ran (the recomputations in backward included)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bn_dropout_mlp()
    calls = [0]
    model[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    wrapper = ReplayModelWrapper(model, split_points=["3"], method=method, microbatches=microbatches, timeout=60)
    if checkpointing:
        wrapper.gradient_checkpointing_enable()
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9), wrapper)
    for x, y in batches(steps):
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    state = wrapper.state_dict()
    wrapper.rank.close()
    return {"model": state, "calls": calls[0]}


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off (p=0), so that the reference in one process draws nothing the ranks would draw otherwise."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def train_zoo(name: str, method: str, steps: int = 3, batch: int = 4, in_model: bool = True) -> dict:
    """A tests/zoo.py model with 2 modules; with ``in_model`` the loss the model computes from ``labels``."""
    from zoo import ZOO, call, loss_of

    torch.set_num_threads(1)
    torch.manual_seed(0)
    entry = ZOO[name]
    model = without_dropout(entry.build())
    wrapper = ReplayModelWrapper(model, num_modules=2, method=method, timeout=60)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for t in range(steps):
        data = entry.batch(batch, t)
        loss_of(entry, call(wrapper, data, with_labels=in_model, entry=entry), data, in_model).backward()
        opt.step()
        opt.zero_grad()
    state = wrapper.state_dict()
    wrapper.rank.close()
    return {"model": state, "split_points": wrapper.split_points}

