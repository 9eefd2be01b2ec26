"""Time to accuracy and final test error per method, K and seed, on digits (or any local dataset).

    python -m bench.accuracy --dataset digits --model resnet8 --modules 2 4 --seeds 0 1 2 --epochs 8

The analogue, at a scale this machine can run, of the paper's Table 2 (best/final test error) and
Figure 4 (test accuracy against time): each (method, K, seed) trains in this process with the
recipe's data path and augmentation, is evaluated every epoch, and reports the final and best test
error, the epochs and training seconds until the test accuracy first reaches `--target`, and the
whole curve.  Prints mean +- std over seeds; writes JSON, a markdown table and a PNG (`--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from recipes.data import Augment, load_image_data
from recipes.models import build_model
from replay_opt import ReplayModelWrapper, ReplayOptimizer

METHODS = ("bp", "fr", "ddg", "dni", "dgl")


def train(data, augment: Augment, args, method: str, k: int, seed: int) -> dict:
    torch.manual_seed(seed)
    wrapper = ReplayModelWrapper(build_model(args.model, data.num_classes), num_modules=k, method=method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4), wrapper)
    steps_per_epoch = -(-len(data.train_y) // args.batch_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in args.milestones], 0.1)
    g = torch.Generator().manual_seed(seed)
    curve, train_time = [], 0.0
    for epoch in range(args.epochs):
        wrapper.train()
        start = time.perf_counter()
        order = torch.randperm(len(data.train_y), generator=g)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(wrapper(augment(data.train_x[idx])), data.train_y[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        train_time += time.perf_counter() - start
        wrapper.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            acc = (wrapper(augment.normalize(data.test_x)).argmax(1) == data.test_y).float().mean().item()
        curve.append({"epoch": epoch + 1, "train_s": train_time, "test_acc": acc})
    reached = next((c for c in curve if c["test_acc"] >= args.target), None)
    return {
        "method": method, "K": k, "seed": seed,
        "final_error": 100 * (1 - curve[-1]["test_acc"]),
        "best_error": 100 * (1 - max(c["test_acc"] for c in curve)),
        "epochs_to_target": reached["epoch"] if reached else None,
        "seconds_to_target": reached["train_s"] if reached else None,
        "curve": curve,
    }  # fmt: skip


def train_all(args: argparse.Namespace) -> list[dict]:
    data = load_image_data(args.dataset)
    augment = Augment(data.mean, data.std)
    runs = []
    for k in args.modules:
        for method in args.methods:
            for seed in args.seeds:
                runs.append(train(data, augment, args, method, k, seed))
                r = runs[-1]
                print(f"{method} K={k} seed={seed}: final error {r['final_error']:.2f}%, best {r['best_error']:.2f}%, "
                      f"epochs to {args.target:.0%}: {r['epochs_to_target']}", flush=True)  # fmt: skip
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--milestones", type=int, nargs="*", default=[5, 7])
    p.add_argument("--target", type=float, default=0.9, help="test accuracy for time-to-accuracy")
    p.add_argument("--out", type=Path, default=Path("bench/results/accuracy"))
    p.add_argument("--from-json", type=Path, default=None, help="re-tabulate saved runs (e.g. for another --target)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        runs = json.loads(args.from_json.read_text())["runs"]
        for r in runs:  # time to the (possibly new) target, from the saved curves
            reached = next((c for c in r["curve"] if c["test_acc"] >= args.target), None)
            r["epochs_to_target"] = reached["epoch"] if reached else None
            r["seconds_to_target"] = reached["train_s"] if reached else None
    else:
        runs = train_all(args)
    lines = [
        f"{args.model} on {args.dataset}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seeds "
        f"{args.seeds}; mean ± std over seeds; time = training seconds on this machine (one process)",
        "",
        f"| K | method | final test error (%) | best test error (%) | epochs to {args.target:.0%} "
        f"| seconds to {args.target:.0%} | reached |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for k in args.modules:
        for method in args.methods:
            rs = [r for r in runs if r["K"] == k and r["method"] == method]
            hit = [r for r in rs if r["epochs_to_target"] is not None]
            cells = [
                mean_std([r["final_error"] for r in rs]),
                mean_std([r["best_error"] for r in rs]),
                mean_std([r["epochs_to_target"] for r in hit]),
                mean_std([r["seconds_to_target"] for r in hit]),
                f"{len(hit)}/{len(rs)}",
            ]
            lines.append(f"| {k} | {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k not in ("out", "from_json")}, "runs": runs}, indent=2
        )
    )
    plot(runs, args, args.out.with_suffix(".png"))


def plot(runs: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.modules), figsize=(5 * len(args.modules), 3.8), squeeze=False)
    for ax, k in zip(axes[0], args.modules):
        for method in args.methods:
            rs = [r for r in runs if r["K"] == k and r["method"] == method]
            epochs = [c["epoch"] for c in rs[0]["curve"]]
            means = [statistics.mean(100 * r["curve"][e]["test_acc"] for r in rs) for e in range(len(epochs))]
            ax.plot(epochs, means, marker="o", label=method)
        ax.set(title=f"K={k}: test accuracy (mean over seeds)", xlabel="epoch", ylabel="%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
