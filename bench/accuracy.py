"""Final test error per method, K and staleness compensation, each at its best learning rate, over seeds.

    python -m bench.accuracy --methods bp fr --modules 4 --compensations none spike+lwp warmup:300 \\
        --lrs 0.01 0.02 --seeds 0 1 2 --epochs 60 --milestones 30 45 --jobs 2 --out bench/results/accuracy_k4

The protocol (the analogue, at a scale this machine can run, of the paper's Table 2): ResNet-8 on the
digits bundled with scikit-learn, batch 64, SGD with momentum 0.9 and weight decay 5e-4, the learning
rate divided by 10 at the milestones.  10% of the training set is held out for validation: for each
(method, K, compensation) the learning rate with the lowest *validation* error (averaged over the
last 5 epochs and the seeds) is chosen, and its *test* error is reported (mean ± std over seeds) -- the test set never
chooses anything.  Every run trains in its own single-thread worker (``--jobs`` at once) with the
recipe's data path and augmentation.  Prints the table; writes JSON (every run, every epoch), the
table as markdown, and a PNG of the test error against the learning rate (``--out``).
``--from-json`` re-tabulates saved runs.
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

from bench.runlog import run_logged

METHODS = ("bp", "fr", "ddg", "dni", "dgl")
STALE = ("fr", "ddg")  # the methods whose gradients are stale, and so the ones compensation applies to

_DATA: dict = {}


def _data(dataset: str, val_fraction: float):
    """The dataset, its augmentation, and a fixed train/validation split (cached per worker)."""
    if dataset not in _DATA:
        from recipes.data import Augment, load_image_data

        data = load_image_data(dataset)
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1234))
        n_val = int(len(order) * val_fraction)
        val, train = order[:n_val], order[n_val:]
        _DATA[dataset] = (data, Augment(data.mean, data.std), train, val)
    return _DATA[dataset]


def train(spec: dict) -> dict:
    """One run: ``spec`` holds method, K, compensation, lr, seed and the schedule."""
    from recipes.models import build_model
    from replay_opt import ReplayModelWrapper, ReplayOptimizer

    torch.set_num_threads(1)
    data, augment, train_rows, val_rows = _data(spec["dataset"], spec["val_fraction"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], data.num_classes)
    wrapper = ReplayModelWrapper(model, num_modules=spec["K"], method=spec["method"])
    sgd = torch.optim.SGD(wrapper.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=5e-4)
    compensation = None if spec["compensation"] == "none" else spec["compensation"]
    opt = ReplayOptimizer(sgd, wrapper, compensation=compensation)
    steps_per_epoch = -(-len(train_rows) // spec["batch_size"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in spec["milestones"]], 0.1)
    g = torch.Generator().manual_seed(spec["seed"])
    curve, start = [], time.perf_counter()
    for epoch in range(spec["epochs"]):
        wrapper.train()
        order = train_rows[torch.randperm(len(train_rows), generator=g)]
        for i in range(0, len(order), spec["batch_size"]):
            idx = order[i : i + spec["batch_size"]]
            loss = F.cross_entropy(wrapper(augment(data.train_x[idx])), data.train_y[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        wrapper.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            val = wrapper(augment.normalize(data.train_x[val_rows])).argmax(1) == data.train_y[val_rows]
            test = wrapper(augment.normalize(data.test_x)).argmax(1) == data.test_y
        curve.append({"epoch": epoch + 1, "val_error": 100 * (1 - val.float().mean().item()),
                      "test_error": 100 * (1 - test.float().mean().item())})  # fmt: skip
    return {**spec, "final_val_error": curve[-1]["val_error"], "final_test_error": curve[-1]["test_error"],
            "best_test_error": min(c["test_error"] for c in curve), "seconds": time.perf_counter() - start,
            "curve": curve}  # fmt: skip


def variants(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(method, K, compensation) to compare; compensation only where gradients are stale."""
    out = []
    for method in args.methods:
        for k in args.modules if method != "bp" else args.modules[:1]:  # BP computes the same at every K
            for comp in args.compensations if method in STALE and k > 1 else ["none"]:
                out.append((method, k, comp))
    return out


def run_all(args: argparse.Namespace) -> list[dict]:
    schedule = {"dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
                "milestones": args.milestones, "val_fraction": args.val_fraction}  # fmt: skip
    specs = [{**schedule, "method": m, "K": k, "compensation": c, "lr": lr, "seed": seed}
             for seed in args.seeds for m, k, c in variants(args) for lr in args.lrs]  # fmt: skip
    # Every finished run is appended to <out>.runs.jsonl at once: an interrupted protocol resumes where it stopped.
    return run_logged(specs, train, args.out.with_suffix(".runs.jsonl"), args.jobs, _key, lambda r: (
        f"{r['method']} K={r['K']} {r['compensation']} lr={r['lr']} seed={r['seed']}: val {r['final_val_error']:.2f}% "
        f"test {r['final_test_error']:.2f}% ({r['seconds']:.0f} s)"))  # fmt: skip


def _key(run: dict) -> tuple:
    names = ("dataset", "model", "epochs", "batch_size", "val_fraction", "method", "K", "compensation", "lr", "seed")
    return (*(str(run[n]) for n in names), str(list(run["milestones"])))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


LAST = 5  # epochs whose validation error chooses the learning rate


def val_score(run: dict) -> float:
    """What chooses the learning rate: the validation error averaged over the last epochs (all at the
    final, smallest learning rate).  The final epoch's alone ties often: with 144 validation images
    it moves in steps of 0.69 %."""
    return statistics.mean(c["val_error"] for c in run["curve"][-LAST:])


def tabulate(runs: list[dict], args: argparse.Namespace) -> tuple[str, list[dict]]:
    chosen = []
    lines = [
        f"{args.model} on {args.dataset}: {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, weight "
        f"decay 5e-4, lr / 10 at epochs {args.milestones}; learning rate chosen from {args.lrs} on a "
        f"{args.val_fraction:.0%} validation split (lowest validation error averaged over the last {LAST} epochs "
        f"and the seeds), seeds {args.seeds}; test error, mean ± std over seeds",
        "",
        "| method | K | compensation | chosen lr | final test error (%) | best test error (%) | val error, last "
        f"{LAST} epochs (%) | final test error at each lr (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    keys = sorted({(r["method"], r["K"], r["compensation"]) for r in runs},
                  key=lambda v: (v[1], METHODS.index(v[0]), v[2] != "none", v[2]))  # fmt: skip
    for method, k, comp in keys:
        rs = [r for r in runs if (r["method"], r["K"], r["compensation"]) == (method, k, comp)]
        by_lr = {lr: [r for r in rs if r["lr"] == lr] for lr in sorted({r["lr"] for r in rs})}
        lr = min(by_lr, key=lambda v: statistics.mean(val_score(r) for r in by_lr[v]))
        best = by_lr[lr]
        row = {"method": method, "K": k, "compensation": comp, "lr": lr,
               "test_error": statistics.mean(r["final_test_error"] for r in best)}  # fmt: skip
        chosen.append(row)
        each = ", ".join(f"{v}: {statistics.mean(r['final_test_error'] for r in by_lr[v]):.2f}" for v in by_lr)
        lines.append(
            f"| {method} | {k} | {comp} | {lr} | {mean_std([r['final_test_error'] for r in best])} | "
            f"{mean_std([r['best_test_error'] for r in best])} | {mean_std([val_score(r) for r in best])} | {each} |"
        )
    return "\n".join(lines), chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--methods", nargs="+", default=["bp", "fr"], choices=METHODS)
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--compensations",
        nargs="+",
        default=["none"],
        help="staleness compensation variants for fr/ddg: none, spike, lwp, warmup[:T], combined with +",
    )
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="the learning-rate grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 45])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--out", type=Path, default=Path("bench/results/accuracy"))
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="re-tabulate saved runs (several JSON files of the same protocol: one table)")  # fmt: skip
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        runs = [r for s in saved for r in s["runs"]]
        for name in ("model", "dataset", "epochs", "batch_size", "milestones", "val_fraction"):
            values = {json.dumps(s["args"][name]) for s in saved}
            if len(values) > 1:
                raise SystemExit(f"--from-json: the files ran different protocols ({name}: {sorted(values)})")
            setattr(args, name, saved[0]["args"][name])
        for name in ("lrs", "seeds"):  # files may extend the grid or the seeds
            setattr(args, name, sorted({v for s in saved for v in s["args"][name]}))
    else:
        runs = run_all(args)
    table, _ = tabulate(runs, args)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    if args.from_json is None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "from_json"}
        args.out.with_suffix(".json").write_text(json.dumps({"args": settings, "runs": runs}, indent=2))
    plot(runs, args.out.with_suffix(".png"))


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["method"], r["K"], r["compensation"]) for r in runs}, key=lambda v: (v[1], v[0], v[2]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, k, comp in keys:
        rs = [r for r in runs if (r["method"], r["K"], r["compensation"]) == (method, k, comp)]
        lrs = sorted({r["lr"] for r in rs})
        means = [statistics.mean(r["final_test_error"] for r in rs if r["lr"] == lr) for lr in lrs]
        label = method.upper() + ("" if method == "bp" else f" K={k}") + ("" if comp == "none" else f" +{comp}")
        ax.plot(lrs, means, marker="o", label=label)
    ax.set(xscale="log", xlabel="learning rate", ylabel="final test error (%), mean over seeds",
           title="test error against the learning rate")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
