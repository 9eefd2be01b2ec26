"""Validate the planner: its predictions against what this machine measures, side by side in one run.

    python -m bench.plan_check --model resnet20 --batch-size 64 --steps 15 --rounds 3

Profiles the model's units with one thread (what each process of a 2-process run has), predicts
with `replay_opt.plan.simulate` the step time of BP on one device and of FR and DDG with one
process per module at two cuts (the planner's and the time-balanced one of `bench.parallel`),
measures the same configurations with `bench.parallel`'s workers (median of interleaved rounds),
and reports predicted vs measured with the relative error.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence

import torch

from bench.parallel import run
from recipes.models import build_model
from replay_opt import ReplayModelWrapper
from replay_opt.plan import Link, best_fr_cut, profile, simulate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=2e9, help="gloo over loopback, bytes/s")
    p.add_argument("--latency", type=float, default=1e-4)
    p.add_argument("--json", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model, 10)
    example = (torch.randn(args.batch_size, 3, 32, 32),)
    units = profile(model, example, repeats=5)
    link = Link(args.bandwidth, args.latency)
    names = [u.name for u in units]
    planner_cut = best_fr_cut(units, 2, link)
    balanced = ReplayModelWrapper(model, num_modules=2, balance="time", example_inputs=example).split_points
    cuts = {"planner": planner_cut, "time-balanced": [names.index(s) for s in balanced]}
    configs = [("BP, one device", {"method": "bp", "modules": 1, "processes": 1, "threads": 1}, [], "one_device")]
    for label, starts in cuts.items():
        split = ",".join(names[i] for i in starts)
        for method in ("fr", "ddg"):
            configs.append(
                (
                    f"{method.upper()} K=2, 2 processes, {label} cut ({split})",
                    {"method": method, "modules": 2, "processes": 2, "threads": 1, "split_points": split},
                    starts,
                    method,
                )
            )
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]  # fmt: skip
    measured: dict[str, list[float]] = {c[0]: [] for c in configs}
    for _ in range(args.rounds):
        for name, config, _, _ in configs:
            measured[name].append(args.batch_size / run({"name": name, **config}, common))
    print(f"{args.model}, batch {args.batch_size}, 1 thread per process; link {args.bandwidth:.2g} B/s, "
          f"{args.latency:.0e} s; measured = median of {args.rounds} rounds")  # fmt: skip
    print("| configuration | predicted s/step | measured s/step | error |\n|---|---|---|---|")
    rows = []
    for name, _, starts, key in configs:
        predicted = simulate(units, starts, link)[key]
        got = statistics.median(measured[name])
        rows.append({"name": name, "predicted_s": predicted, "measured_s": got, "error": predicted / got - 1})
        print(f"| {name} | {predicted:.4f} | {got:.4f} | {100 * (predicted / got - 1):+.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
