"""Planner: predict the step time of K devices from a profile taken on one, and recommend K and the cut.

    python -m replay_opt.plan --model recipes.models:resnet110 --batch-size 128 --max-modules 8 --bandwidth 25e9
    python -m replay_opt.plan --model path/to/hf_model_dir --batch-size 8 --seq-len 512

``--model`` takes any model: ``package.module:function``, ``file.py:function``, ``torchvision:NAME``,
``timm:NAME``, or a transformers model directory / ``config.json`` (``_model_spec.py``).

Each unit of the model (see ``ReplayModelWrapper.units``) is timed forward and backward on one
device, and the bytes that cross a cut placed after it are counted (every value alive there,
residuals included); the same on a micro-batch and on a DDP replica's share of the batch.  Each
of these profiles is then scaled to the whole model's step timed end to end on its batch
(``calibrated``): the units give the shape, the whole step the scale.  For a cut into modules
with forward time F_k, backward time B_k and boundary transfer time c_k = latency + bytes_k /
bandwidth, one training step takes

* BP, naive model parallelism (every device waits):  sum_k (F_k + B_k) + 2 sum_k c_k
* GPipe with M micro-batches (fill and drain):         sum_k (f_k + c_k) + (M-1) max_k (f_k + c_k)
                                                       + the same for b_k,  with f_k, b_k module k's times on a
                                                       micro-batch (profiled at B/M; F_k / M without that
                                                       profile), c_k for a micro-batch
* 1F1B with M micro-batches: the same bubble as GPipe (it only reorders the steady state so that
  at most K micro-batches' activations are alive instead of M)
* DDP over K devices (B/K samples each):               the model's time on B/K samples + a ring all-reduce of the
                                                       gradients, 2 (K-1)/K * bytes / bandwidth + 2 (K-1) latency
                                                       (not overlapped with the backward pass: an upper bound)
* DDG, one process per module (no one waits):          max_k (F_k + B_k + c_k)
* FR, one process per module:                          max_k (2 F_k + B_k + c_k, k < K;  F_K + B_K)
  (module k < K plays and replays; the last module only plays)

The last two are steady-state throughput bounds: in a step every device does its own work and
sends its activations on (c_K = 0), and nobody waits for anybody else's backward pass -- unless
two modules share a parameter (a tied embedding: the first and the last module).  Their gradients
are summed at every ``optimizer.step()``, so the first module's next forward waits for this step's
forwards of every module up to the last and the last module's backward: the step then takes at
least F_1 + c_1 + ... + F_K + B_K + the exchange (``tied_chain``).
``recommend`` picks, for each K, the cut that minimises the predicted FR step (exact dynamic
programming) and reports the speed-up over one device.  docs/benchmarks.md compares these
predictions with measurements on this machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ._model_spec import FORMS, example_inputs, load_model
from .cut.balance import UnitProfile, profile, step_seconds
from .cut.units import balanced_starts, min_max_cut


@dataclass
class Link:
    bandwidth: float = 25e9  # bytes/s between neighbouring devices
    latency: float = 2e-5  # seconds per message

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


DEFAULT_LINK = Link()


def _modules(units: Sequence[UnitProfile], starts: Sequence[int]) -> list[tuple[float, float, int]]:
    bounds = [0, *starts, len(units)]
    return [
        (
            sum(u.forward_s for u in units[a:b]),
            sum(u.backward_s for u in units[a:b]),
            units[b - 1].output_bytes,
        )
        for a, b in itertools.pairwise(bounds)
    ]


def tied_modules(units: Sequence[UnitProfile], starts: Sequence[int]) -> dict[tuple[int, int], int]:
    """The pairs of modules (a < b) that share parameters under this cut, and how many bytes of gradient
    they exchange at every optimizer step (fp32)."""
    bounds = [0, *starts, len(units)]
    module_of = [m for m, (a, b) in enumerate(itertools.pairwise(bounds)) for _ in range(a, b)]
    pairs: dict[tuple[int, int], int] = {}
    for i, u in enumerate(units):
        for j in u.tied:
            a, b = module_of[i], module_of[j]
            if a < b:
                pairs[(a, b)] = max(pairs.get((a, b), 0), 4 * u.tied_params)
    return pairs


def tied_chain(
    mods: Sequence[tuple[float, float, int]], pairs: Mapping[tuple[int, int], int], link: Link, replay: bool
) -> float:
    """The longest path of one step through a tied weight, with one process per module (FR, DDG).

    Modules a < b sharing a parameter sum its gradient at every ``optimizer.step()``, so module a's next
    forward waits for module b's backward of this step, which waits for this step's forwards of modules
    a..b: F_a + c_a + ... + F_b (+ F_b again for FR's replay, unless b is the last module, which only plays)
    + B_b + the exchange.  Without shared parameters no such path exists: a step then takes the busiest
    module's own work."""
    chain = 0.0
    last = len(mods) - 1
    for (a, b), nbytes in pairs.items():
        forward = sum(mods[k][0] for k in range(a, b + 1))
        sends = sum(link.time(mods[k][2]) for k in range(a, b))
        replayed = mods[b][0] if replay and b < last else 0.0
        chain = max(chain, forward + sends + replayed + mods[b][1] + link.time(nbytes))
    return chain


def calibrated(
    profiles: Mapping[int, Sequence[UnitProfile]], seconds: Mapping[int, float]
) -> dict[int, list[UnitProfile]]:
    """Each profile (by batch fraction n) scaled so that its units add up to the whole model's step timed end to
    end on that batch (``step_seconds``): the units give the shape, the whole step the scale.  Units timed one by
    one, each run again on caches it has just warmed, misjudge how one batch size compares with another -- on
    this project's CPU a micro-batch of 32 looked 16 % cheaper per sample than a batch of 128, and ran no
    cheaper -- which decides between micro-batched schedules and the rest."""
    out = {}
    for n, units in profiles.items():
        total = sum(u.forward_s + u.backward_s for u in units)
        f = seconds[n] / total if n in seconds and total > 0 else 1.0
        out[n] = [
            replace(u, forward_s=u.forward_s * f, backward_s=u.backward_s * f,
                    input_backward_s=None if u.input_backward_s is None else u.input_backward_s * f,
                    weight_backward_s=None if u.weight_backward_s is None else u.weight_backward_s * f)
            for u in units
        ]  # fmt: skip
    return out


def _fr_step(mods: Sequence[tuple[float, float, int]], pairs: Mapping[tuple[int, int], int], link: Link) -> float:
    """FR with one process per module: module k < K plays, replays, back-propagates and sends on; the last plays
    and back-propagates; the step is the busiest module's, or the chain through a tied weight if longer."""
    work = [2 * f + b + link.time(nbytes) for f, b, nbytes in mods[:-1]] + [mods[-1][0] + mods[-1][1]]
    return max(max(work), tied_chain(mods, pairs, link, replay=True))


def simulate(
    units: Sequence[UnitProfile],
    starts: Sequence[int],
    link: Link = DEFAULT_LINK,
    microbatches: int = 4,
    replicas: int | None = None,
    smaller: Mapping[int, Sequence[UnitProfile]] | None = None,
) -> dict[str, float]:
    """Predicted seconds per training step on K = len(starts) + 1 devices, per schedule
    (``replicas``: the devices DDP spreads the batch over; K by default).

    ``smaller``: the same units profiled on 1/n of the batch, by n -- what a micro-batch (n = M) or
    a DDP replica's share (n = replicas) really costs (on a GPU, far more than 1/n of the full
    batch's time).  Without a profile for n, a unit on 1/n of the batch takes 1/n of its time.
    """
    mods = _modules(units, starts)
    pairs = tied_modules(units, starts)
    d = replicas or len(mods)
    m = microbatches
    smaller = smaller or {}
    micro_mods = _modules(smaller[m], starts) if m in smaller else [(f / m, b / m, n) for f, b, n in mods]
    param_bytes = 4 * sum(u.params for u in units)
    comm = [link.time(nbytes) for _, _, nbytes in mods[:-1]]
    out = [*comm, 0.0]  # what each module sends on; the last sends nothing
    micro = [link.time(nbytes / m) for _, _, nbytes in mods[:-1]] + [0.0]
    fill = [f + c for (f, _, _), c in zip(micro_mods, micro)]
    drain = [b + c for (_, b, _), c in zip(micro_mods, micro)]
    one_device = sum(u.forward_s + u.backward_s for u in units)
    share = sum(u.forward_s + u.backward_s for u in smaller[d]) if d in smaller else one_device / d
    forward_pass = sum(fill) + (m - 1) * max(fill)
    gpipe = forward_pass + sum(drain) + (m - 1) * max(drain)
    return {
        "one_device": one_device,
        "ddp": share + (2 * (d - 1) * (link.latency + param_bytes / d / link.bandwidth) if d > 1 else 0.0),
        "bp": sum(f + b for f, b, _ in mods) + 2 * sum(comm),
        "gpipe": gpipe,
        "1f1b": gpipe,
        "gpipe_loop": forward_pass + gpipe,  # method="gpipe"/"1f1b": a forward-only pass, then the schedule
        "ddg": max(max(f + b + c for (f, b, _), c in zip(mods, out)), tied_chain(mods, pairs, link, replay=False)),
        "fr": _fr_step(mods, pairs, link),
    }


TWO_PER_RANK = {"i1f1b": "loop", "izb": "loop", "zbv": "v", "dualpipev": "v"}


def simulate_two_per_rank(
    units: Sequence[UnitProfile],
    starts: Sequence[int],
    link: Link = DEFAULT_LINK,
    microbatches: int = 4,
    smaller: Mapping[int, Sequence[UnitProfile]] | None = None,
) -> dict[str, float]:
    """Predicted seconds per step of the schedules that hold two stages per rank, for a cut into 2K stages
    (``starts``: 2K-1 indices) on K ranks.

    Per micro-batch, rank r runs forward F_r and backward over its two stages, each including the messages it
    sends to another rank.  The zero-bubble schedules split the backward into the input-gradient pass B and
    the weight-gradient pass W, as profiled by ``profile(split_backward=True)`` -- in eager PyTorch the two
    passes cost more than the one they replace (1.3-1.7x on this project's CPU) -- or, unprofiled, half the
    backward each, as the Zero Bubble paper measures them on GPUs.  With S = max_r (F_r + B_r + W_r), F, B, W
    of the slowest rank and M micro-batches:

    * ``i1f1b``  interleaved 1F1B (Narayanan et al., 2021), rank r holds stages r and r+K:
      M S + (K-1) S / 2 -- the 1F1B bubble, (K-1) S, shrunk by the two chunks per rank (its backward is
      not split: S = F + the profiled backward);
    * ``izb``    interleaved zero bubble: M S + (K-1) max(F + B - W, 0) / 2 -- ZB-H1's bubble (Qi et al., 2024)
      shrunk likewise;
    * ``zbv``    ZB-V, stages r and 2K-1-r in a V: M S + (K-1) max(F + B - 2W, 0) / 2 -- ZB-H2's bubble on
      half-size chunks;
    * ``dualpipev``  DualPipeV (DeepSeek-V3's DualPipe folded into a V): M S + (K-1) max(F + 2B - 3W, 0) / 2
      -- DualPipe's bubble with no overlap of one chunk's forward and another's backward (F&B = F + B).
    """
    k2 = len(starts) + 1
    if k2 % 2:
        raise ValueError(f"two stages per rank need an even number of stages, got {k2}")
    k, m = k2 // 2, microbatches
    smaller = smaller or {}
    mods = _modules(units, starts)
    micro = _modules(smaller[m], starts) if m in smaller else [(f / m, b / m, n / m) for f, b, n in mods]
    split = _split_backward(smaller.get(m, units), starts, 1 if m in smaller else m)
    out: dict[str, float] = {}
    for name, style in TWO_PER_RANK.items():
        rank_of = [i % k if style == "loop" else min(i, k2 - 1 - i) for i in range(k2)]
        # per rank, per micro-batch, with the messages it sends: forward, backward, its input and weight passes
        forward, backward, inputs, weights = ([0.0] * k for _ in range(4))
        for i, (f, b, nbytes) in enumerate(micro):
            r = rank_of[i]
            up = link.time(nbytes) if i < k2 - 1 and rank_of[i + 1] != r else 0.0
            down = link.time(micro[i - 1][2]) if i > 0 and rank_of[i - 1] != r else 0.0
            b_in, w = split[i] if split else (b / 2, b / 2)
            forward[r] += f + up
            backward[r] += b + down
            inputs[r] += b_in + down
            weights[r] += w
        if name == "i1f1b":
            r = max(range(k), key=lambda r: forward[r] + backward[r])
            s = forward[r] + backward[r]
            out[name] = m * s + (k - 1) * s / 2
            continue
        r = max(range(k), key=lambda r: forward[r] + inputs[r] + weights[r])
        f, b, w = forward[r], inputs[r], weights[r]
        bubble = {"izb": max(f + b - w, 0.0), "zbv": max(f + b - 2 * w, 0.0),
                  "dualpipev": max(f + 2 * b - 3 * w, 0.0)}[name]  # fmt: skip
        out[name] = m * (f + b + w) + (k - 1) * bubble / 2
    return out


def _split_backward(units: Sequence[UnitProfile], starts: Sequence[int], scale: int) -> list[tuple[float, float]]:
    """Per module, its input-gradient and weight-gradient passes (divided by ``scale``); [] if not profiled."""
    if any(u.input_backward_s is None or u.weight_backward_s is None for u in units):
        return []
    bounds = [0, *starts, len(units)]
    return [
        (sum(u.input_backward_s for u in units[a:b]) / scale, sum(u.weight_backward_s for u in units[a:b]) / scale)
        for a, b in itertools.pairwise(bounds)
    ]


TIED_SEARCH_LIMIT = 20_000  # cuts tried one by one when a tied weight makes the step more than the busiest module


def best_fr_cut(units: Sequence[UnitProfile], k: int, link: Link = DEFAULT_LINK) -> list[int]:
    """Start indices of modules 2..K minimising the predicted FR step: exact DP over contiguous cuts; with
    shared parameters (whose ``tied_chain`` the DP cannot see) every cut, where there are few enough."""
    n = len(units)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} units into {k} modules")
    if k > 1 and any(u.tied for u in units) and math.comb(n - 1, k - 1) <= TIED_SEARCH_LIMIT:
        cuts = itertools.combinations(range(1, n), k - 1)
        return list(min(cuts, key=lambda c: _fr_step(_modules(units, c), tied_modules(units, c), link)))
    f = [0.0]
    b = [0.0]
    for u in units:
        f.append(f[-1] + u.forward_s)
        b.append(b[-1] + u.backward_s)

    def cost(i: int, j: int, last: bool) -> float:  # units i..j-1 as one module
        work = (f[j] - f[i]) * (1 if last else 2) + (b[j] - b[i])
        return work + (0.0 if last else link.time(units[j - 1].output_bytes))

    return min_max_cut(n, k, cost)


CHOICES = ("ddp", "gpipe", "1f1b", *TWO_PER_RANK, "ddg", "fr")  # what a user can train with on K devices


def recommend(
    units: Sequence[UnitProfile],
    max_modules: int,
    link: Link = DEFAULT_LINK,
    microbatches: int = 4,
    smaller: Mapping[int, Sequence[UnitProfile]] | None = None,
) -> list[dict[str, Any]]:
    """For each K, the best FR cut, the predicted step time of every schedule (each on its own balanced cut:
    FR's, forward + backward's for the others, 2K stages for those with two per rank), and the fastest."""
    rows = []
    work = [u.forward_s + u.backward_s for u in units]
    for k in range(1, min(max_modules, len(units)) + 1):
        starts = best_fr_cut(units, k, link)
        times = simulate(units, starts, link, microbatches, smaller=smaller)
        even = simulate(units, balanced_starts(work, k), link, microbatches, smaller=smaller)
        times.update({name: even[name] for name in ("bp", "gpipe", "1f1b", "gpipe_loop", "ddg")})
        if k > 1 and 2 * k <= len(units) and microbatches >= 2 * k:
            times.update(simulate_two_per_rank(units, balanced_starts(work, 2 * k), link, microbatches, smaller))
        fastest = min((c for c in CHOICES if c in times), key=lambda c: times[c]) if k > 1 else "one_device"
        rows.append(
            {
                "K": k,
                "split_points": [units[i].name for i in starts],
                **{f"{name}_s": t for name, t in times.items()},
                "fr_speedup": times["one_device"] / times["fr"],
                "fastest": fastest,
                "fastest_speedup": times["one_device"] / times[fastest],
            }
        )
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict multi-device step times and recommend K and split points.")
    p.add_argument("--model", required=True, help=f"the model to plan: {FORMS}")
    p.add_argument("--num-classes", type=int, default=10, help="for torchvision:NAME / timm:NAME")
    p.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32], help="one input, without the batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, for a transformers model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-modules", type=int, default=8)
    p.add_argument("--bandwidth", type=float, default=25e9, help="bytes/s between neighbouring devices")
    p.add_argument("--latency", type=float, default=2e-5, help="seconds per message")
    p.add_argument("--microbatches", type=int, default=4, help="GPipe/1F1B micro-batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the profile and the table here")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = load_model(args.model, args.num_classes).to(args.device)

    def batch(size: int) -> Any:
        return example_inputs(model, size, tuple(args.input_shape), args.seq_len)

    # The units on the batch, on a micro-batch and on each DDP replica's share of the batch; each scaled to the
    # whole model's step on that batch, timed end to end.
    fractions = [1, *sorted({args.microbatches, *range(2, args.max_modules + 1)})]
    examples = {n: batch(args.batch_size // n) for n in fractions if args.batch_size // n >= 1}
    timed = {n: profile(model, x, split_backward=n == args.microbatches) for n, x in examples.items()}
    profiles = calibrated(timed, step_seconds(model, examples))
    units, smaller = profiles.pop(1), profiles
    link = Link(args.bandwidth, args.latency)
    rows = recommend(units, args.max_modules, link, args.microbatches, smaller)
    print(f"{args.model}, batch {args.batch_size}, profiled on {args.device}; link {args.bandwidth:.3g} B/s, "
          f"{args.latency:.1e} s; GPipe with {args.microbatches} micro-batches; seconds per step")  # fmt: skip
    columns = ["one_device", "ddp", "bp", "gpipe", *TWO_PER_RANK, "ddg", "fr"]
    print(f"| K | FR split points | {' | '.join(columns)} | FR speed-up | fastest (speed-up) |")
    print("|---|---|" + "---|" * (len(columns) + 2))
    for r in rows:
        cells = " | ".join(f"{r[c + '_s']:.4f}" if c + "_s" in r else "-" for c in columns)
        print(f"| {r['K']} | {', '.join(r['split_points']) or '-'} | {cells} | {r['fr_speedup']:.2f}x | "
              f"{r['fastest']} ({r['fastest_speedup']:.2f}x) |")  # fmt: skip
    best = min(rows, key=lambda r: r["fr_s"])
    good = next(r for r in rows if r["fr_s"] <= 1.05 * best["fr_s"])
    print(f"FR: K={good['K']}, split_points={good['split_points']} (within 5% of FR's best predicted step)")
    top = min(rows, key=lambda r: r[r["fastest"] + "_s"])
    verdict = "Features Replay" if top["fastest"] == "fr" else top["fastest"]
    print(f"recommended: {verdict} on K={top['K']} devices, predicted {top['fastest_speedup']:.2f}x one device "
          "(memory is not modelled: DDP keeps the whole model and optimizer on every device; GPipe/1F1B keep "
          "micro-batches' activations; FR about one device's)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"units": [asdict(u) for u in units], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
