"""One rank of a multi-process training run, for tests/test_distributed.py.

Launched as W processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (what torchrun and
accelerate launch set).  Trains the deep MLP of the tests with one process per module, D = W / K
data-parallel replicas, replica d taking batch t*D + d at step t.  Writes the full trained state
(collected from every rank) to OUT/final.pt, and optionally a checkpoint at --save-at.
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
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--die-rank", type=int, default=None)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = world // args.modules

    torch.manual_seed(0)
    model = mlp(depth=6)
    wrapper = ReplayModelWrapper(
        model, split_points=SPLITS[args.modules] or None, num_modules=args.modules, method=args.method,
        timeout=args.timeout,
    )  # fmt: skip
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), wrapper)
    start = 0
    if args.resume is not None:
        saved = torch.load(args.resume, weights_only=False)
        wrapper.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    data = batches(args.steps * replicas, last=5)  # the very last batch is smaller
    losses = []
    for t in range(start, args.steps):
        x, y = data[t * replicas + wrapper.layout.replica]
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(wrapper.sum_over_last_modules(loss.detach())) / replicas)
        if args.die_rank == rank and args.die_at == t:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.save_at == t + 1:
            state = {"model": wrapper.state_dict(), "opt": opt.state_dict(), "step": t + 1}
            if rank == 0:
                torch.save(state, args.out / "checkpoint.pt")
            dist.barrier()
    state = wrapper.state_dict()
    if rank == 0:
        torch.save({"model": state, "losses": losses}, args.out / "final.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
