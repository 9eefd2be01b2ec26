"""The regime map: where Features Replay is the fastest way to train on K devices, measured and predicted.

    python -m bench.regime --models resnet56 gpt2-lm --batch-sizes 16 32 64 128 --out bench/results/regime

For each model and batch size, one ``bench.peers`` run (its contenders side by side, interleaved rounds,
each on its own balanced cut, K=2) writes its rows to ``<out>/<model>_b<batch>.json``; this script reads
them back and, per cell, names the measured fastest contender, the fastest among those whose busiest rank
holds no more memory than FR's, and the planner's predicted fastest -- and how often the planner agrees.
``--from-json`` rebuilds the table from earlier runs without measuring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIE = 0.05  # contenders whose medians differ by less than this are taken as equally fast
CONTENDERS = ["bp", "ddp", "fr", "ddg", "gpipe:4", "1f1b:2", "1f1b:4", "i1f1b:4", "zbv:4", "dualpipev:4"]


def run_cell(model: str, batch: int, out: Path, args: argparse.Namespace) -> Path:
    path = out / f"{model}_b{batch}.json"
    cmd = [sys.executable, "-m", "bench.peers", "--model", model, "--batch-size", str(batch), "--modules",
           str(args.modules), "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
           "--only", *args.contenders, "--json", str(path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{model}_b{batch}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return path


def add_split_profiles(path: Path) -> None:
    """For a cell measured before ``bench.peers`` profiled the zero-bubble schedules' split backward: profile it
    now on the cell's micro-batches and keep, per unit, the split passes in proportion to the cell's own backward
    time (so the cell's profile keeps its scale)."""
    import torch

    from bench.peers import build, example_batch
    from replay_opt.cut.balance import profile

    data = json.loads(path.read_text())
    model_name = path.stem.rsplit("_b", 1)[0]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(model_name)
    for n, units in data["smaller"].items():
        if int(n) == data["modules"] or all(u.get("input_backward_s") is not None for u in units):
            continue
        x, _ = example_batch(model_name, data["batch_size"] // int(n), torch.Generator().manual_seed(1))
        fresh = profile(model, (x,), repeats=5, split_backward=True)
        assert [u.name for u in fresh] == [u["name"] for u in units], path
        for u, f in zip(units, fresh):
            scale = u["backward_s"] / f.backward_s if f.backward_s > 0 else 0.0
            u["input_backward_s"], u["weight_backward_s"] = f.input_backward_s * scale, f.weight_backward_s * scale
        data.setdefault("split_profiled_afterwards", []).append(int(n))
    path.write_text(json.dumps(data, indent=2))


def load(path: Path) -> list[dict[str, Any]]:
    """A cell's rows; predicted again with today's planner where the run kept its profiles and cuts."""
    from bench.peers import predicted_again

    data = json.loads(path.read_text())
    if "units" in data:
        for row, (speed, ratio) in zip(data["rows"], predicted_again(data).values()):
            row["predicted_samples_per_s"], row["predicted_ratio"] = speed, ratio
    return data["rows"]


def cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest contender measured, the fastest at FR's memory or less, the fastest predicted."""
    ok = [r for r in rows if "failed" not in r and r["name"] != "bp"]
    fr = next(r for r in ok if r["name"] == "fr")
    fr_peak = max(fr["peak_mib"])
    fastest = max(ok, key=lambda r: r["samples_per_s"])
    within = [r for r in ok if max(r["peak_mib"]) <= fr_peak * 1.05]  # (5 %: the CPU figure is coarse)
    fastest_within = max(within, key=lambda r: r["samples_per_s"])
    predicted = max(ok, key=lambda r: r["predicted_samples_per_s"])

    def both(r: dict[str, Any]) -> str:  # measured (predicted) ratio to one-device BP
        return f"{r['ratio']:.2f} ({r['predicted_ratio']:.2f})"

    def best(names: set[str]) -> str:
        group = [r for r in ok if r["name"].split(":")[0] in names]
        top = max(group, key=lambda r: r["ratio"], default=None)
        return "-" if top is None else f"{top['name']} {both(top)}"

    by_name = {r["name"]: r for r in ok}
    return {
        "fr": both(fr), "ddp": both(by_name["ddp"]), "ddg": both(by_name["ddg"]),
        "ddp_ratio": by_name["ddp"]["ratio"], "ddg_ratio": by_name["ddg"]["ratio"],
        "best_one_stage": best({"gpipe", "1f1b"}), "best_two_stage": best({"i1f1b", "izb", "zbv", "dualpipev"}),
        "fastest": fastest["name"], "fastest_ratio": fastest["ratio"], "fr_ratio": fr["ratio"],
        "fastest_at_fr_memory": fastest_within["name"], "predicted": predicted["name"],
        "agree": predicted["name"] == fastest["name"],
        # a tie: the planner's choice measured within TIE of the fastest (less than one round's spread here)
        "agree_within_noise": predicted["samples_per_s"] >= (1 - TIE) * fastest["samples_per_s"],
        "failed": [r["name"] for r in rows if "failed" in r],
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "gpt2-lm"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--modules", type=int, default=2)
    p.add_argument("--contenders", nargs="+", default=CONTENDERS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/results/regime")
    p.add_argument("--from-json", action="store_true", help="tabulate earlier runs in --out without measuring")
    p.add_argument("--split-profiles", action="store_true",
                   help="with --from-json: first profile the zero-bubble split for cells that lack it")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | batch | FR | DDP | DDG | best GPipe/1F1B | best two-stage | measured fastest | fastest at FR's "
             "memory | planner's choice |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cells = []
    for model in args.models:
        for batch in args.batch_sizes:
            path = out / f"{model}_b{batch}.json"
            if not args.from_json:
                run_cell(model, batch, out, args)
            elif args.split_profiles:
                add_split_profiles(path)
            c = cell(load(path))
            cells.append({"model": model, "batch": batch, **c})
            mark = "" if c["agree"] else " (a tie)" if c["agree_within_noise"] else " (differs)"
            lines.append(f"| {model} | {batch} | {c['fr']} | {c['ddp']} | {c['ddg']} | "
                         f"{c['best_one_stage']} | {c['best_two_stage']} | **{c['fastest']}** | "
                         f"{c['fastest_at_fr_memory']} | {c['predicted']}{mark} |")  # fmt: skip
            print(lines[-1], flush=True)
    agree, ties = sum(c["agree"] for c in cells), sum(c["agree_within_noise"] and not c["agree"] for c in cells)
    lines.append(f"\nMeasured (predicted) ratios to one-device BP. The planner names the measured fastest in {agree} "
                 f"of {len(cells)} cells, and in {ties} more a contender that measured within {TIE:.0%} of it (a tie).")
    (out / "regime.md").write_text("\n".join(lines) + "\n")
    (out / "regime.json").write_text(json.dumps(cells, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
