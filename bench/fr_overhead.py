"""FR's one-device step against what it must cost: BP's step plus the play forward of modules 1..K-1.

    python -m bench.fr_overhead --rounds 7

On one device Features Replay does BP's work (module k replays its stored input with a graph and
back-propagates: one forward with a graph and one backward per module, as BP) plus the *play*: a
forward without a graph through modules 1..K-1 on the new batch.  So FR's step should be BP's step
plus that forward -- anything beyond is overhead of the library (histories, RNG states, contexts).
For each model and K, in interleaved rounds on one thread: the model's own step, the wrapper's
``bp`` and ``fr`` steps, and the play forward alone (modules 1..K-1 under ``torch.no_grad()``);
medians, and FR / (BP + play).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def models() -> dict[str, tuple[Callable[[], torch.nn.Module], Any, Callable[[Any, Any], torch.Tensor]]]:
    """name -> (build, batch, loss(model, batch))."""
    out: dict[str, Any] = {}
    try:
        import transformers

        cfg = transformers.GPT2Config(n_layer=6, n_embd=128, n_head=4, vocab_size=512, n_positions=64)
        ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
        out["gpt2 6x128, 8x64 tokens"] = (
            lambda: transformers.GPT2LMHeadModel(cfg),
            {"input_ids": ids, "labels": ids},
            lambda model, batch: model(**batch).loss,
        )
    except ImportError:  # pragma: no cover - transformers is an extra
        pass
    from recipes.models import build_model

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    out["resnet20, batch 64"] = (
        lambda: build_model("resnet20", 10),
        (x, y),
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    )
    return out


def measure(rounds: int, ks: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for name, (build, batch, loss_of) in models().items():
        runs: dict[str, Callable[[], None]] = {}
        plays: dict[int, Callable[[], None]] = {}
        for label, method, k in [("plain", None, 1)] + [(f"{m} K={k}", m, k) for k in ks for m in ("bp", "fr")]:
            torch.manual_seed(0)
            model = build()
            wrapper = model if method is None else ReplayModelWrapper(model, num_modules=k, method=method)
            inner = torch.optim.SGD(wrapper.parameters(), lr=1e-3)
            opt = inner if method is None else ReplayOptimizer(inner, wrapper)

            def step(wrapper=wrapper, opt=opt, loss_of=loss_of, batch=batch) -> None:
                loss_of(wrapper, batch).backward()
                opt.step()
                opt.zero_grad()

            runs[label] = step
            if method == "fr":
                step()  # (captured)
                partition = wrapper.partition
                args, kwargs = ((), dict(batch)) if isinstance(batch, dict) else ((batch[0],), {})

                def play(partition=partition, args=args, kwargs=kwargs) -> None:
                    x = partition.select(partition.bind(args, kwargs), True).inputs
                    with torch.no_grad():
                        for stage in partition.stages[:-1]:
                            x = stage.train(*x)

                plays[k] = play
        times: dict[str, list[float]] = {label: [] for label in [*runs, *(f"play K={k}" for k in plays)]}
        calls = {**runs, **{f"play K={k}": f for k, f in plays.items()}}
        for f in calls.values():  # warm-up
            f()
            f()
        for _ in range(rounds):
            for label, f in calls.items():
                start = time.perf_counter()
                f()
                times[label].append(time.perf_counter() - start)
        med = {label: statistics.median(ts) for label, ts in times.items()}
        for k in ks:
            bp, fr, play = med[f"bp K={k}"], med[f"fr K={k}"], med[f"play K={k}"]
            rows.append({"model": name, "K": k, "plain_s": med["plain"], "bp_s": bp, "fr_s": fr, "play_s": play,
                         "fr_over_bp_plus_play": fr / (bp + play)})  # fmt: skip
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds, args.modules)
    print(f"one device (CPU, {args.threads} thread), median of {args.rounds} interleaved rounds; ratios to the model's "
          "own step")  # fmt: skip
    print("| model | K | bp | fr | play forward, modules 1..K-1 | FR / (BP + play) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        plain = r["plain_s"]
        print(f"| {r['model']} | {r['K']} | {r['bp_s'] / plain:.3f} | {r['fr_s'] / plain:.3f} | "
              f"{r['play_s'] / plain:.3f} | {r['fr_over_bp_plus_play']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
