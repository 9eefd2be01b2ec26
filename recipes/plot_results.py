"""Plot one or more runs of resnet_cifar.py or causal_lm.py from their results.json files.

python recipes/plot_results.py outputs/fr/results.json outputs/bp/results.json -o runs.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files written by a recipe")
    p.add_argument("-o", "--output", type=Path, default=Path("runs.png"))
    p.add_argument("--sigma", action="store_true", help="plot the diagnostics (sigma per module) instead")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.sigma:
        plot_sigma(args)
        return
    runs = [json.loads(path.read_text()) for path in args.results]
    if all("unigram_perplexity" in r for r in runs):  # language-model runs
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from recipes.causal_lm import plot

        plot(runs, args.output)
    else:
        plot_runs(runs, args.output)
    print(f"wrote {args.output}")


def plot_runs(runs: list[dict[str, Any]], output: Path) -> Path:
    """Training loss against the step and test accuracy against the epoch, one line per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        label = f"{r['method'].upper()} K={r['modules']} {r['model']}"
        steps, losses = zip(*r["train_loss_log"]) if r["train_loss_log"] else ((), ())
        ax_loss.plot(steps, losses, label=label)
        evals = [h for h in r["history"] if "test/acc" in h]
        ax_acc.plot([h["epoch"] for h in evals], [100 * h["test/acc"] for h in evals], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (batch)", title="train/loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test/acc")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def plot_sigma(args: argparse.Namespace) -> None:
    """Figure 3 of the paper: sigma of each module against the step -- staleness alone (the same samples'
    true gradient) and the paper's sigma (a reference batch's) -- one row of panels per run."""
    runs = [json.loads(path.read_text()) for path in args.results]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.8 * len(runs)), squeeze=False)
    for row, r in zip(axes, runs):
        records = r["diagnostics"]
        title = f"{r['method'].upper()} K={r['modules']} {r['model']}"
        for ax, name, what in ((row[0], "sigma_staleness", "staleness alone (same samples)"),
                               (row[1], "sigma_expected", "the paper's sigma (512-sample reference)")):  # fmt: skip
            for k in range(len(records[0][name])):
                ax.plot([d["step"] for d in records], [d[name][k] for d in records], label=f"module {k + 1}", lw=1)
            ax.set(xlabel="step", ylabel="sigma", title=f"{title}: {what}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
