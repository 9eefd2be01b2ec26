"""Step time, throughput and memory per method x K x model, side by side in one run, as ratios to BP.

    python -m bench.step --models resnet20 resnet56 resnet110 --modules 1 2 4 --batch-size 128

Every configuration trains on random 32x32 inputs in this process, on one device (`--device`),
for `--warmup` + `--steps` steps, in `--rounds` interleaved rounds; the step time is the median
of all measured steps.  Memory is
what the library's accounting says each module holds for backward on the last step, plus
`torch.cuda.max_memory_allocated` per device on a GPU.  On one device the K modules cannot run
concurrently, so this measures each method's *work* (FR's replay forward, DDG's graphs, DNI's
synthesizers); the speed-up that K devices would bring is what `python -m replay_opt.plan` predicts.
Writes JSON, a markdown table and a PNG plot (`--out`).
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

from recipes.models import build_model
from replay_opt import ReplayModelWrapper, ReplayOptimizer

METHODS = ("bp", "fr", "ddg", "dni", "dgl")


def measure(model_name: str, method: str, k: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    wrapper = ReplayModelWrapper(build_model(model_name, 10).to(device), num_modules=k, method=method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9), wrapper)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()

    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    # Memory on K untimed steps with accounting on (so graphs kept across steps are counted too).
    wrapper.track_memory = True
    for _ in range(k):
        step()
    held = wrapper.memory_report()
    assert held["complete"]
    return {
        "model": model_name,
        "method": method,
        "K": k,
        "device": device,
        "step_times_s": times,
        "held_mib": held["total"] / 2**20,
        "held_mib_per_module": [m["total"] / 2**20 for m in held["modules"]],
        "cuda_max_allocated_mib": {d: b / 2**20 for d, b in held["cuda_max_memory_allocated"].items()},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    p.add_argument("--modules", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/step"))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    for model_name in args.models:
        measure(model_name, "bp", 1, args.batch_size, 1, 1, args.device)  # warm the allocator and kernels up
        by_config: dict[tuple[int, str], list[dict]] = {}
        for _ in range(args.rounds):  # interleaved, so drift hits every configuration alike
            for k in args.modules:
                for method in args.methods:
                    r = measure(model_name, method, k, args.batch_size, args.steps, args.warmup, args.device)
                    by_config.setdefault((k, method), []).append(r)
        for runs in by_config.values():
            row = runs[-1]
            row["step_s"] = statistics.median(t for r in runs for t in r["step_times_s"])
            row["samples_per_s"] = args.batch_size / row["step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        bp = next(r for r in rows if r["model"] == row["model"] and r["K"] == 1 and r["method"] == "bp")
        row["time_ratio_to_bp"] = row["step_s"] / bp["step_s"]
        row["memory_ratio_to_bp"] = row["held_mib"] / bp["held_mib"]
    lines = [
        f"device: {device_name}; batch {args.batch_size}; median of {args.rounds} interleaved rounds x {args.steps} "
        f"steps (each after {args.warmup} warm-up steps); ratios to BP with K=1 on the same model",
        "",
        "| model | K | method | step (s) | samples/s | step time / BP | held for backward (MiB) | memory / BP "
        "| per module (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{m:.0f}" for m in r["held_mib_per_module"])
        lines.append(
            f"| {r['model']} | {r['K']} | {r['method']} | {r['step_s']:.3f} | {r['samples_per_s']:.0f} | "
            f"{r['time_ratio_to_bp']:.2f} | {r['held_mib']:.0f} | {r['memory_ratio_to_bp']:.2f} | {per} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"), device_name)


def plot(rows: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6), squeeze=False)
    for j, model_name in enumerate(models):
        for i, (key, label) in enumerate(
            [("time_ratio_to_bp", "step time / BP"), ("memory_ratio_to_bp", "memory / BP")]
        ):
            ax = axes[i][j]
            ks = sorted({r["K"] for r in rows})
            methods = list(dict.fromkeys(r["method"] for r in rows))
            width = 0.8 / len(methods)
            for m_i, method in enumerate(methods):
                vals = [
                    next(r[key] for r in rows if r["model"] == model_name and r["K"] == k and r["method"] == method)
                    for k in ks
                ]
                ax.bar([x + m_i * width for x in range(len(ks))], vals, width, label=method)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ks))], [f"K={k}" for k in ks])
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"{model_name}: {label}", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"bench.step on {device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
