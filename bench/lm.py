"""Final validation perplexity of the language-model recipe per method, K and staleness compensation, each at its
best learning rate, over seeds: the protocol behind FR's accuracy on transformers with AdamW.

    python -m bench.lm --modules 2 4 --compensations none predict --lrs 1e-3 3e-3 --seeds 0 1 2 --steps 400 \\
        --jobs 2 --out bench/results/lm_gpt2_tiny

Every run is ``recipes/causal_lm.py`` itself (gpt2-tiny on the bundled Python-stdlib corpus, block 128, batch 16,
AdamW betas (0.9, 0.95), weight decay 0.1, linear warm-up then cosine decay to 10 % over ``--steps``), in its own
single-thread worker (``--jobs`` at once), evaluated every ``--eval-every`` steps.  For each (method, K,
compensation) the learning rate with the lowest final validation loss averaged over the seeds is chosen; the table
gives its final validation perplexity (mean ± std over seeds) and the gap to BP's.  Finished runs are appended to
``<out>.runs.jsonl`` at once and are not run again: an interrupted protocol resumes where it stopped.  Writes the
table (markdown), every run (JSON) and the curves of the chosen runs (validation perplexity against step, PNG).
``--from-json`` re-tabulates saved runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.accuracy import mean_std
from bench.runlog import run_logged

SCHEDULE = ("model", "steps", "warmup", "eval_every", "batch_size", "block_size")


def train(spec: dict) -> dict:
    """One run of the recipe: ``spec`` holds method, K, compensation, lr, seed and the schedule."""
    import torch

    torch.set_num_threads(1)
    from recipes.causal_lm import main

    with tempfile.TemporaryDirectory() as out:
        flags = {"model": "--model", "method": "--method", "K": "--modules", "steps": "--steps", "warmup": "--warmup",
                 "eval_every": "--eval-every", "batch_size": "--batch-size", "block_size": "--block-size",
                 "lr": "--lr", "seed": "--seed", "compensation": "--compensation",
                 "optimizer": "--optimizer"}  # fmt: skip
        argv = [w for key, flag in flags.items() for w in (flag, str(spec[key]))]
        argv += ["--report-to", "none", "--output-dir", out, "--keep-checkpoints", "1", "--log-every", "10"]
        start = time.perf_counter()
        results = main(argv)
    curve = [{"step": h["step"], "val_loss": h["val/loss"]} for h in results["history"]]
    kept = ("final_val_loss", "final_val_perplexity", "unigram_perplexity", "train_loss_log")
    return {**spec, **{k: results[k] for k in kept}, "seconds": time.perf_counter() - start, "curve": curve}


def variants(args: argparse.Namespace) -> list[tuple[str, int, str, str]]:
    """Per optimizer: BP once (it computes the same at every K), FR at each K with each compensation; or the list
    given with ``--variants method:K:compensation:optimizer ...``."""
    if args.variants:
        return [(m, int(k), c, o) for m, k, c, o in (v.split(":") for v in args.variants)]
    return [
        v
        for opt in args.optimizers
        for v in [("bp", 1, "none", opt)] + [("fr", k, c, opt) for k in args.modules for c in args.compensations]
    ]


def variant(run: dict) -> tuple[str, int, str, str]:
    return run["method"], run["K"], run["compensation"], run.get("optimizer", "adamw")


def _key(run: dict) -> tuple:
    return (*(str(run[n]) for n in (*SCHEDULE, "method", "K", "compensation", "lr", "seed")),
            run.get("optimizer", "adamw"))  # fmt: skip


def _describe(r: dict) -> str:
    return (f"{r['method']} K={r['K']} {r['compensation']} {r.get('optimizer', 'adamw')} lr={r['lr']} "
            f"seed={r['seed']}: val perplexity {r['final_val_perplexity']:.2f} ({r['seconds']:.0f} s)")  # fmt: skip


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every variant at every lr on ``--lr-seeds`` (all seeds by default); then, if other seeds are asked for, those
    at each variant's chosen lr only."""
    schedule = {n: getattr(args, n) for n in SCHEDULE}
    log = args.out.with_suffix(".runs.jsonl")

    def spec(v: tuple, lr: float, seed: int) -> dict:
        return {**schedule, "method": v[0], "K": v[1], "compensation": v[2], "optimizer": v[3], "lr": lr, "seed": seed}

    lr_seeds = args.lr_seeds if args.lr_seeds is not None else args.seeds
    first = [spec(v, lr, seed) for seed in lr_seeds for v in variants(args) for lr in args.lrs]
    runs = run_logged(first, train, log, args.jobs, _key, _describe)
    rest = [spec(v, lr, seed) for v, (lr, _, _) in choose(runs).items() for seed in args.seeds if seed not in lr_seeds]
    return runs + run_logged(rest, train, log, args.jobs, _key, _describe) if rest else runs


def choose(runs: list[dict]) -> dict[tuple[str, int, str, str], tuple[float, list[dict], dict[float, list[dict]]]]:
    """Per variant: the learning rate with the lowest final validation loss, mean over the seeds every lr ran with;
    returns (lr, all its runs, runs by lr)."""
    chosen = {}
    for v in sorted({variant(r) for r in runs}, key=lambda v: (v[3], v[1], v[2])):
        rs = [r for r in runs if variant(r) == v]
        by_lr = {lr: [r for r in rs if r["lr"] == lr] for lr in sorted({r["lr"] for r in rs})}
        common = set.intersection(*({r["seed"] for r in group} for group in by_lr.values()))
        lr = min(by_lr, key=lambda x: statistics.mean(r["final_val_loss"] for r in by_lr[x] if r["seed"] in common))
        chosen[v] = (lr, by_lr[lr], by_lr)
    return chosen


def predicted_step_seconds(args: argparse.Namespace) -> dict[int, float]:
    """Seconds per training step the planner predicts: BP on one device (key 1) and FR on K devices at the cut the
    recipe makes (``replay_opt.plan.simulate`` on a profile of the model's units, taken on this machine's CPU)."""
    import torch

    from recipes.causal_lm import build
    from replay_opt import ReplayModelWrapper
    from replay_opt.cut.balance import profile
    from replay_opt.plan import simulate

    torch.manual_seed(0)
    model = build(args.model, 257, args.block_size)  # the byte tokenizer of the bundled corpus: 256 bytes + END
    ids = torch.randint(0, 257, (args.batch_size, args.block_size))
    example = {"input_ids": ids, "labels": ids}
    units = profile(model, example)
    names = [u.name for u in units]
    seconds = {1: simulate(units, [])["one_device"]}
    for k in args.modules:
        cut = ReplayModelWrapper(model, num_modules=k, example_inputs=example).split_points
        seconds[k] = simulate(units, [names.index(p) for p in cut])["fr"]
    return seconds


def mean_curve(run_group: list[dict]) -> list[tuple[int, float]]:
    """(step, validation perplexity averaged over the group's seeds) at each evaluation."""
    return [(point["step"], statistics.mean(math.exp(r["curve"][i]["val_loss"]) for r in run_group))
            for i, point in enumerate(run_group[0]["curve"])]  # fmt: skip


def time_to_reach(run_group: list[dict], target: float, step_seconds: float) -> float | None:
    """Predicted device seconds until the mean validation perplexity first reaches ``target`` (None: never)."""
    return next((step * step_seconds for step, ppl in mean_curve(run_group) if ppl <= target), None)


def perplexity_at(run_group: list[dict], step: float) -> tuple[int, float]:
    """(the last evaluation at or before ``step``, the mean validation perplexity there)."""
    curve = mean_curve(run_group)
    return ([point for point in curve if point[0] <= step] or curve[:1])[-1]


def tabulate(runs: list[dict], args: argparse.Namespace, step_seconds: dict[int, float] | None = None) -> str:
    chosen = choose(runs)
    bp_runs = {v[3]: best for v, (_, best, _) in chosen.items() if v[0] == "bp"}
    bp_ppl = {v[3]: statistics.mean(r["final_val_perplexity"] for r in best) for v, (_, best, _) in chosen.items()
              if v[0] == "bp"}  # fmt: skip
    lines = [
        f"{args.model} on the Python-stdlib corpus: {args.steps} steps, batch {args.batch_size} x {args.block_size} "
        f"tokens, AdamW (0.9, 0.95) or Muon + AdamW, weight decay 0.1, {args.warmup} warm-up steps then cosine decay; "
        f"learning rate chosen from {args.lrs} on the final validation loss (mean over the seeds every lr ran with); "
        "final validation perplexity, mean ± std over seeds, each compared with BP's with the same optimizer",
        "",
        "| optimizer | method | K | compensation | chosen lr | seeds | final validation perplexity | vs BP "
        "| at each lr | predicted s/step | predicted device time to BP's final perplexity | BP at the same "
        "device time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, k, comp, opt), (lr, best, by_lr) in chosen.items():
        ppl = [r["final_val_perplexity"] for r in best]
        base = bp_ppl.get(opt)
        gap = "" if base is None or method == "bp" else f"{100 * (statistics.mean(ppl) / base - 1):+.1f} %"
        each = ", ".join(f"{v}: {statistics.mean(r['final_val_perplexity'] for r in by_lr[v]):.2f}" for v in by_lr)
        step, reach, same_time = "", "", ""
        if step_seconds is not None and base is not None:
            step = f"{step_seconds[k]:.3f}"
            seconds = time_to_reach(best, base, step_seconds[k])
            reach = "not reached" if seconds is None else f"{seconds:.0f} s"
            if method != "bp":  # where BP's curve is after the device time this variant's whole run takes
                at, value = perplexity_at(bp_runs[opt], args.steps * step_seconds[k] / step_seconds[1])
                same_time = f"{value:.2f} (step {at})"
        seeds = ",".join(str(r["seed"]) for r in best)
        lines.append(f"| {opt} | {method} | {k if method != 'bp' else '-'} | {comp} | {lr} | {seeds} | {mean_std(ppl)} "
                     f"| {gap} | {each} | {step} | {reach} | {same_time} |")  # fmt: skip
    if step_seconds is not None:
        lines += ["", "Predicted s/step: the planner (replay_opt.plan.simulate) on a profile of the model's units on "
                  "this machine's CPU, BP on one device, FR on K devices at the recipe's cut; device time = steps x "
                  "s/step, at the evaluations (every "
                  f"{args.eval_every} steps); BP at the same device time: BP's perplexity at its last evaluation "
                  "within the device time the variant's whole run takes (mid-schedule: BP's lr has not decayed yet "
                  "there, so a BP run given that budget as its schedule would do better)."]  # fmt: skip
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Validation perplexity against step for each variant at its chosen learning rate (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (method, k, comp, opt), (lr, best, _) in choose(runs).items():
        steps, ppl = zip(*mean_curve(best))
        label = ("BP" if method == "bp" else f"FR K={k}" + ("" if comp == "none" else f" +{comp}")) + f", {opt}"
        ax.plot(steps, ppl, marker="o", ms=3, label=f"{label} (lr {lr})", ls="-" if comp != "none" else "--")
    ax.axhline(runs[0]["unigram_perplexity"], color="gray", ls=":", label="unigram baseline")
    ax.set(xlabel="optimizer step", ylabel="validation perplexity (mean over seeds)", yscale="log",
           title="FR against BP on a transformers LM (each at its chosen lr)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument("--compensations", nargs="+", default=["none", "predict"],
                   help="FR's staleness compensation variants: none, predict, momentum, ... (+ combines)")  # fmt: skip
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--lr-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds every lr runs with (the lr is chosen on them); the other seeds run at the chosen lr only",
    )
    p.add_argument("--optimizers", nargs="+", choices=("adamw", "muon"), default=["adamw"])
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="explicit variants, method:K:compensation:optimizer (fr:2:predict:muon), instead of the grid",
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--out", type=Path, default=Path("bench/results/lm"))
    p.add_argument("--from-json", type=Path, default=None, help="re-tabulate the runs saved by an earlier call")
    p.add_argument(
        "--from-runs",
        action="store_true",
        help="tabulate every finished run of this schedule in <out>.runs.jsonl (several invocations)",
    )
    p.add_argument("--no-device-time", action="store_true", help="skip the planner's device-time prediction")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_runs:  # every finished run of this schedule in <out>.runs.jsonl, from any number of invocations
        log = args.out.with_suffix(".runs.jsonl")
        runs = [r for r in map(json.loads, log.read_text().splitlines())
                if all(r[n] == getattr(args, n) for n in SCHEDULE)]  # fmt: skip
        args.modules = sorted({r["K"] for r in runs if r["K"] > 1})
        args.lrs = sorted({r["lr"] for r in runs})
    elif args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        runs = saved["runs"]
        for name, value in saved["args"].items():
            if name not in ("out", "from_json", "no_device_time"):
                setattr(args, name, value)
    else:
        runs = run_all(args)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "from_json"}
        args.out.with_suffix(".json").write_text(json.dumps({"args": settings, "runs": runs}, indent=2))
    table = tabulate(runs, args, None if args.no_device_time else predicted_step_seconds(args))
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(runs, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
