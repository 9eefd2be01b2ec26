"""Parallel efficiency of one process per module on this machine's CPU cores.

    python -m bench.parallel --model resnet20 --batch-size 64 --steps 20 --rounds 3

Measures training throughput (samples/s, steady state) side by side, in one run, rounds interleaved:

* FR, K=1, one process, 1 thread        (the baseline: FR with K=1 is plain backprop)
* BP, one process, 2 threads
* FR, K=2, two processes x 1 thread     (gloo; split points balanced by measured time)

and reports each as a ratio to the baseline.  The ideal for FR K=2 is below 2x: module 1 also
replays (one extra forward of its half), and the two halves are only as balanced as the cut.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    from recipes.models import build_model
    from replay_opt import ReplayModelWrapper, ReplayOptimizer

    torch.manual_seed(0)
    model = build_model(args.model, 10)
    splits = args.split_points.split(",") if args.split_points else None
    wrapper = ReplayModelWrapper(model, num_modules=args.modules, split_points=splits, method=args.method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9), wrapper)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - start
    if wrapper.layout is not None:
        torch.distributed.barrier()
    if wrapper.layout is None or wrapper.layout.rank == 0:
        print(json.dumps({"samples_per_s": args.steps * args.batch_size / elapsed}))


def run(config: dict, common: list[str]) -> float:
    cmd = ["--worker", "--threads", str(config["threads"]), "--method", config["method"],
           "--modules", str(config["modules"]), *common]  # fmt: skip
    if config.get("split_points"):
        cmd += ["--split-points", config["split_points"]]
    out = launch("bench.parallel", cmd, config["processes"], config["threads"], config["name"])
    return out["samples_per_s"]


def launch(module: str, argv: list[str], processes: int, threads: int, name: str) -> dict:
    """``python -m module argv`` in ``processes`` fresh ranks (torchrun's environment); rank 0's last JSON line."""
    port = _free_port()
    env_base = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "WORLD_SIZE": str(processes)}  # fmt: skip
    running = [
        subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(processes)
    ]
    outs = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise RuntimeError(f"{name} failed (exit codes {[p.returncode for p in running]})")
    return json.loads(outs[0].strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--method", default="fr", help=argparse.SUPPRESS)
    p.add_argument("--modules", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--split-points", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
        return

    from recipes.models import build_model
    from replay_opt import ReplayModelWrapper

    torch.set_num_threads(1)
    torch.manual_seed(0)
    example = (torch.randn(args.batch_size, 3, 32, 32),)
    cut = ReplayModelWrapper(build_model(args.model, 10), num_modules=2, balance="time", example_inputs=example)
    splits = ",".join(cut.split_points)
    configs = [
        {"name": "FR K=1, 1 process x 1 thread", "method": "fr", "modules": 1, "processes": 1, "threads": 1},
        {"name": "BP, 1 process x 1 thread", "method": "bp", "modules": 1, "processes": 1, "threads": 1},
        {"name": "BP, 1 process x 2 threads", "method": "bp", "modules": 1, "processes": 1, "threads": 2},
        {"name": "FR K=2, 2 processes x 1 thread", "method": "fr", "modules": 2, "processes": 2, "threads": 1,
         "split_points": splits},
    ]  # fmt: skip
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]  # fmt: skip
    samples: dict[str, list[float]] = {c["name"]: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            samples[c["name"]].append(run(c, common))
    base = statistics.median(samples[configs[0]["name"]])
    print(f"model {args.model}, batch {args.batch_size}, K=2 split at {splits}; median of {args.rounds} rounds")
    print("| configuration | samples/s | ratio to FR K=1 (1 thread) |\n|---|---|---|")
    rows = []
    for c in configs:
        med = statistics.median(samples[c["name"]])
        rows.append({"name": c["name"], "samples_per_s": med, "ratio": med / base, "rounds": samples[c["name"]]})
        print(f"| {c['name']} | {med:.1f} | {med / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
