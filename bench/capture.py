"""Time to capture each model of the test zoo, by tracer, and what the capture gives.

    python -m bench.capture

For every model of ``tests/zoo.py`` (tiny random-init configs of transformers, torchvision and
timm families): which tracer ``capture="auto"`` ends up using, the seconds the first capture
takes in a fresh process (the first torch.export of a process also pays for its own warm-up, so
the models are measured in separate processes), the units found, and K=4's split points.
Writes a markdown table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str) -> dict:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    from zoo import ZOO

    from replay_opt import ReplayModelWrapper

    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build().train()
    batch = entry.batch(4, 0)
    example = batch if isinstance(batch, dict) else (batch[0],)
    start = time.perf_counter()
    wrapper = ReplayModelWrapper(model, num_modules=4, example_inputs=example)
    seconds = time.perf_counter() - start
    program = wrapper.partition.programs()[0]
    return {
        "model": name,
        "class": type(model).__name__,
        "tracer": program.graph.tracer,
        "capture_s": round(program.graph.seconds, 2),
        "wrap_s": round(seconds, 2),
        "units": len(wrapper.units),
        "split_points": wrapper.split_points,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import ZOO

    rows = []
    for name in args.models or list(ZOO):
        out = subprocess.run([sys.executable, "-m", "bench.capture", "--one", name], capture_output=True, text=True,
                             cwd=ROOT, check=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| model | class | tracer | capture (s) | wrap, K=4 (s) | units | K=4 split points |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['class']} | {r['tracer']} | {r['capture_s']:.2f} | {r['wrap_s']:.2f} | "
              f"{r['units']} | {', '.join(r['split_points'])} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
