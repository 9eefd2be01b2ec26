"""Bytes held for backward per method and K (the paper's Table 1 / Figure 5), measured with replay_opt's accounting.

    python -m bench.memory --model resnet56 --modules 2 4 --batch-size 32
    python -m bench.memory --model resnet56 --modules 2 --checkpointing   # each method also checkpointed

Runs a few training steps per (method, K) on random 32x32 inputs, past the pipeline fill, and
reports what each method holds for backward on the last step, absolute and as a ratio to BP.
With ``--checkpointing`` every method runs a second time with activation checkpointing
(``model.gradient_checkpointing_enable()``: each module keeps its inputs only and is recomputed in
backward, one module at a time -- that recomputation's activations are not "held", and not counted).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from recipes.models import build_model
from replay_opt import ReplayModelWrapper, ReplayOptimizer

METHODS = ("bp", "fr", "ddg", "dni", "dgl")


def held_for_backward(model_name: str, method: str, k: int, batch: int, device: str, checkpointing: bool = False
                      ) -> dict:  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    wrapper = ReplayModelWrapper(model, num_modules=k, method=method, track_memory=True)
    if checkpointing:
        wrapper.gradient_checkpointing_enable()
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9), wrapper)
    for _ in range(k + 2):
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    return wrapper.memory_report()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpointing", action="store_true", help="also run each method with activation checkpointing")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    rows = []
    header = ["model", "K", "method", "held for backward (MiB)", "ratio to BP"]
    header += ["activations", "retained graphs", "history", "stale gradients"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for k in args.modules:
        bp = None
        for method, checkpointing in [(m, c) for m in METHODS for c in (False, True)
                                  if c <= args.checkpointing and not (c and m == "ddg")]:  # (ddg refuses it)
            r = held_for_backward(args.model, method, k, args.batch_size, args.device, checkpointing)
            bp = bp or r["total"]
            method = method + (" + checkpointing" if checkpointing else "")
            mib = {c: r[c] / 2**20 for c in ("total", "activations", "retained_graphs", "history", "stale_gradients")}
            rows.append(
                {
                    "model": args.model,
                    "K": k,
                    "method": method,
                    "device": args.device,
                    **mib,
                    "ratio_to_bp": r["total"] / bp,
                }
            )
            cells = [args.model, k, method, f"{mib['total']:.1f}", f"{r['total'] / bp:.2f}"]
            cells += [f"{mib[c]:.1f}" for c in ("activations", "retained_graphs", "history", "stale_gradients")]
            print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
