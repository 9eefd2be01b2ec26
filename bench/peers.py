"""Against the peers: every way to train one model on K devices, side by side in one interleaved run.

    python -m bench.peers --model resnet20 --batch-size 64 --modules 2 --steps 10 --rounds 3

Contenders (the same model, global batch and K; SGD; cross-entropy):

* ``bp``           one device (one process): the baseline every ratio is taken to
* ``ddp``          DistributedDataParallel over K processes, B/K samples each
* ``mp``           replay_opt ``method="bp"``, one process per module: naive model parallelism
* ``fr``, ``ddg``  replay_opt Features Replay and delayed gradients, one process per module
* ``gpipe:M``, ``1f1b:M``  torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B with M micro-batches,
                   on ``PipelineStage``s built by hand from the model's own modules
* ``gpipe-traced:M``, ``1f1b-traced:M``  the same, the stages made by the library's tracer frontend
                   ``pipeline()`` (an exported aten graph; not in the default set -- ask with ``--only``)
* ``loop-gpipe:M``, ``loop-1f1b:M``  the same schedules through replay_opt's two lines and a standard loop
                   (``method="gpipe"``/``"1f1b"``: a forward-only pass first, see replay_opt/multiprocess/schedules.py)
* ``i1f1b:M``, ``izb:M``  ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble: two stages per rank,
                   interleaved (rank r holds stages r and r+K of 2K)
* ``zbv:M``, ``dualpipev:M``  ScheduleZBVZeroBubble / ScheduleDualPipeV: two stages per rank in a V (rank r
                   holds stages r and 2K-1-r); the zero-bubble schedules split each backward into input- and
                   weight-gradient passes that fill the bubble
* ``torchgpipe:M`` torchgpipe's GPipe (one process, K devices) if it is installed

Each pipeline runs on the cut that balances its own device time in the planner's profile: FR's
(module 1 also replays), and forward + backward for all the others.  Each contender runs in fresh
processes (``bench.parallel.launch``), once per round, the rounds interleaved so a slow spell of
the machine hits every contender alike; the median of the rounds is reported.  Peak memory per
rank: on CUDA the allocator's peak during the timed steps; on CPU the growth of the resident set
over the run (what the steps added to what the model and data took), which includes the
allocator's caching -- a coarse figure.  The planner (``replay_opt.plan.simulate``) predicts each
contender's step time from one-thread profiles of the model's units (on the batch, on a
micro-batch, on a DDP replica's share) and a ping-pong measurement of the link between two ranks;
the table puts the prediction next to the measurement, and the predicted ranking is checked
against the measured one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.parallel import launch

ONE_PROCESS = {"bp", "torchgpipe"}


def contenders(k: int, microbatches: Sequence[int]) -> list[str]:
    out = ["bp", "ddp", "mp", "fr", "ddg"]
    out += [f"{s}:{m}" for s in ("gpipe", "1f1b", "loop-gpipe", "loop-1f1b") for m in microbatches]
    out += [f"{s}:{m}" for s in MULTI_STAGE for m in microbatches if m >= 2 * k]  # (they need M >= 2K)
    return [*out, *(f"torchgpipe:{m}" for m in microbatches)]


# --------------------------------------------------------------------------- one contender, one rank


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    if args.contender == "link":
        print(json.dumps(measure_link(args.bytes, device)))
        return
    torch.manual_seed(0)
    model = build(args.model)
    x, y = example_batch(args.model, args.batch_size, torch.Generator().manual_seed(1))
    splits = args.split_points.split(",")
    step = STEPS[args.contender.split(":")[0]](model, x, y, device, splits, args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss0 = _rss_bytes()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes() - rss0
    mine = {"elapsed": elapsed, "peak_bytes": peak}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if rank == 0:
        slowest = max(r["elapsed"] for r in ranks)
        print(json.dumps({"samples_per_s": args.steps * args.batch_size / slowest,
                          "peak_bytes": [r["peak_bytes"] for r in ranks]}), flush=True)  # fmt: skip
    if world > 1:
        # Leave together: drop the schedule (and any send work it still holds) and let every rank get here
        # before the process group goes (a group torn down under pending gloo sends can abort the process).
        del step
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_link(nbytes: int, device: torch.device) -> dict[str, float]:
    """One-way time of an 8-byte and an ``nbytes`` message between ranks 0 and 1 (ping-pong, median)."""
    out = {}
    for size in (8, nbytes):
        t = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
        times = []
        for _ in range(12):
            dist.barrier()
            start = time.perf_counter()
            if dist.get_rank() == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif dist.get_rank() == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
            times.append((time.perf_counter() - start) / 2)
        out[str(size)] = statistics.median(times[2:])
    latency = out["8"]
    bandwidth = (nbytes - 8) / max(out[str(nbytes)] - latency, 1e-9)
    return {"latency": latency, "bandwidth": bandwidth}


# --------------------------------------------------------------------------- the models

# A name here -> the LM recipe's config (recipes/causal_lm.py); "-untied": its own output matrix (no weight shared
# by the first and the last module, so no exchange of that weight's gradient at every optimizer step).
LM_MODELS = {"gpt2-lm": "gpt2-tiny", "gpt2-lm-untied": "gpt2-tiny"}
LM_VOCAB, LM_SEQ = 512, 64


class Logits(torch.nn.Module):
    """A causal LM as a function of its token ids: the logits (every contender calls the model alike)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


class _Embed(torch.nn.Module):
    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device)))


def build(name: str) -> torch.nn.Module:
    """The recipes' CIFAR ResNets (``resnet56``, ``torchvision:NAME``) or the LM recipe's GPT-2 (``gpt2-lm``)."""
    if name in LM_MODELS:
        from recipes.causal_lm import build as build_lm

        model = build_lm(LM_MODELS[name], LM_VOCAB, LM_SEQ)
        if name.endswith("-untied"):
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return Logits(model)
    from recipes.models import build_model

    return build_model(name, 10)


def example_batch(name: str, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): 32x32 images and classes, or token ids and the next tokens."""
    if name in LM_MODELS:
        ids = torch.randint(0, LM_VOCAB, (size, LM_SEQ + 1), generator=generator)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _lm_loss if name in LM_MODELS else F.cross_entropy


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def step_bp(model, x, y, device, splits, args) -> Callable[[], None]:
    if type(model).__name__ != "GPipe":  # (torchgpipe places its partitions itself)
        model.to(device)
    x, y = x.to(device), y.to(device)
    opt = _sgd(model.parameters())

    def step() -> None:
        loss_fn(args.model)(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def step_ddp(model, x, y, device, splits, args) -> Callable[[], None]:
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    return step_bp(ddp, x[shard], y[shard], device, splits, args)


def step_replay(model, x, y, device, splits, args) -> Callable[[], None]:
    from replay_opt import ReplayModelWrapper, ReplayOptimizer

    method, _, m = args.contender.removeprefix("loop-").partition(":")
    method = {"mp": "bp"}.get(method, method)
    wrapper = ReplayModelWrapper(
        model, split_points=splits, method=method, timeout=300, microbatches=int(m) if m else None
    )
    opt = ReplayOptimizer(_sgd(wrapper.parameters()), wrapper)
    x, y = x.to(device), y.to(device)

    def step() -> None:
        loss_fn(args.model)(wrapper(x), y).backward()  # rank 0 runs the last module: the real loss
        opt.step()
        opt.zero_grad()

    return step


def step_schedule(model, x, y, device, splits, args) -> Callable[[], None]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    kind, m = args.contender.split(":")
    m = int(m)
    rank, world = dist.get_rank(), dist.get_world_size()
    if kind.endswith("-traced"):  # the library's tracer frontend: pipeline() exports the model to an aten graph
        pipe = pipeline(model, mb_args=(x[: len(x) // m],), split_spec={s: SplitPoint.BEGINNING for s in splits})
        stage = pipe.build_stage(rank, device)
    else:  # stages built by hand from the model's own modules (eager, as torchtitan does)
        stage = PipelineStage(_stages(model, splits)[rank].to(device), rank, world, device)
    schedule = (ScheduleGPipe if kind.startswith("gpipe") else Schedule1F1B)(stage, n_microbatches=m,
                                                                            loss_fn=loss_fn(args.model))  # fmt: skip
    opt = _sgd(stage.submod.parameters())
    x, y = x.to(device), y.to(device)

    def step() -> None:
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        opt.step()
        opt.zero_grad()

    return step


# Schedules with two stages per rank: the model cut into 2K stages, placed as each schedule needs --
# interleaved (rank r: stages r and r+K) or in a V (rank r: stages r and 2K-1-r, so rank 0 holds the first
# and the last stage).  The zero-bubble ones split each backward into input- and weight-gradient passes.
MULTI_STAGE = {"i1f1b": ("ScheduleInterleaved1F1B", "loop"), "izb": ("ScheduleInterleavedZeroBubble", "loop"),
               "zbv": ("ScheduleZBVZeroBubble", "v"), "dualpipev": ("ScheduleDualPipeV", "v")}  # fmt: skip


def stages_of_rank(rank: int, world: int, style: str) -> list[int]:
    """The stage indices rank ``rank`` holds, of 2 x ``world`` stages, in the schedule's placement."""
    return [rank, rank + world] if style == "loop" else [rank, 2 * world - 1 - rank]


def step_multi_stage(model, x, y, device, splits, args) -> Callable[[], None]:
    from torch.distributed import pipelining

    kind, m = args.contender.split(":")
    cls_name, style = MULTI_STAGE[kind]
    rank, world = dist.get_rank(), dist.get_world_size()
    pieces = _stages(model, splits)  # 2K eager stages
    if len(pieces) != 2 * world:
        raise ValueError(f"{kind} needs {2 * world} stages, got {len(pieces)}")
    mine = stages_of_rank(rank, world, style)
    stages = [pipelining.PipelineStage(pieces[i].to(device), i, 2 * world, device) for i in mine]
    schedule = getattr(pipelining, cls_name)(stages, n_microbatches=int(m), loss_fn=loss_fn(args.model))
    opt = _sgd([p for s in stages for p in s.submod.parameters()])
    x, y = x.to(device), y.to(device)
    first, last = 0 in mine, 2 * world - 1 in mine

    def step() -> None:
        schedule.step(*((x,) if first else ()), **({"target": y} if last else {}))
        opt.step()
        opt.zero_grad()

    return step


def step_torchgpipe(model, x, y, device, splits, args) -> Callable[[], None]:
    from torchgpipe import GPipe

    m = int(args.contender.split(":")[1])
    stages = _stages(model, splits)
    seq = torch.nn.Sequential(*(unit for stage in stages for unit in stage))
    gpipe = GPipe(seq, balance=[len(s) for s in stages], devices=[device] * len(stages), chunks=m)
    return step_bp(gpipe, x, y, device, splits, args)


def _stages(model: torch.nn.Module, splits: Sequence[str]) -> list[torch.nn.Sequential]:
    """The model cut before each split point, each piece an nn.Sequential of its units (eager modules)."""
    names, units = _named_units(model)
    if not set(splits) <= set(names):
        raise ValueError(f"hand-built stages need split points among {names}, got {splits}")
    starts = [0, *(names.index(s) for s in splits), len(names)]
    return [torch.nn.Sequential(*units[a:b]) for a, b in itertools.pairwise(starts)]


def _named_units(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Module]]:
    """The model as its units in order, named as the planner's profile names them: the recipes' CIFAR ResNet,
    or the language model (embeddings, blocks, final norm + head)."""
    if isinstance(model, Logits):
        gpt = model.model.transformer
        named = [("model.transformer.wte", _Embed(gpt)),
                 *((f"model.transformer.h.{i}", block) for i, block in enumerate(gpt.h)),
                 ("model.transformer.ln_f", torch.nn.Sequential(gpt.ln_f, model.model.lm_head))]  # fmt: skip
        return [n for n, _ in named], [module for _, module in named]
    blocks = [(f"layers.{i}.{j}", block) for i, stage in enumerate(model.layers) for j, block in enumerate(stage)]
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), model.fc)
    named = [("conv1", model.conv1), ("bn1", torch.nn.Sequential(model.bn1, torch.nn.ReLU())), *blocks, ("fc", head)]
    return [n for n, _ in named], [module for _, module in named]


STEPS = {"bp": step_bp, "ddp": step_ddp, "mp": step_replay, "fr": step_replay, "ddg": step_replay,
         "gpipe": step_schedule, "1f1b": step_schedule, "gpipe-traced": step_schedule, "1f1b-traced": step_schedule,
         "torchgpipe": step_torchgpipe, **dict.fromkeys(MULTI_STAGE, step_multi_stage),
         "loop-gpipe": step_replay, "loop-1f1b": step_replay}  # fmt: skip


# --------------------------------------------------------------------------- the run


def predict(units: Sequence[Any], starts: list[int], link: Any, name: str, k: int, smaller: Any) -> float:
    from replay_opt.plan import simulate, simulate_two_per_rank

    kind, _, m = name.partition(":")
    if kind in MULTI_STAGE:  # (``starts``: the cut into 2K stages)
        return simulate_two_per_rank(units, starts, link, microbatches=int(m), smaller=smaller)[kind]
    times = simulate(units, starts, link, microbatches=int(m) if m else 1, replicas=k, smaller=smaller)
    kinds = {"bp": "one_device", "mp": "bp", "torchgpipe": "gpipe", "gpipe-traced": "gpipe", "1f1b-traced": "1f1b",
             "loop-gpipe": "gpipe_loop", "loop-1f1b": "gpipe_loop"}  # fmt: skip
    return times[kinds.get(kind, kind)]


def cut_of(name: str) -> str:
    """Which cut a contender runs on: FR's own, the 2K stages of the two-per-rank schedules, or forward + backward's."""
    return "fr" if name == "fr" else "two per rank" if name.split(":")[0] in MULTI_STAGE else "others"


def predicted_ratios(names: Sequence[str], batch: int, units: Any, cuts: dict[str, list[int]], link: Any, k: int,
                     smaller: Any) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Each contender's predicted samples/s and its ratio to one-device BP's."""
    base = batch / predict(units, cuts["fr"], link, "bp", k, smaller)
    out = {}
    for name in names:
        speed = batch / predict(units, cuts[cut_of(name)], link, name, k, smaller)
        out[name] = (speed, speed / base)
    return out


def predicted_again(data: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``predicted_ratios`` from what a ``--json`` file kept (profiles, cuts, link): today's planner on that cell."""
    from replay_opt.plan import Link, UnitProfile, calibrated

    def profiles(rows: list[dict[str, Any]]) -> list[Any]:
        return [UnitProfile(**{**u, "tied": tuple(u.get("tied", ()))}) for u in rows]

    by_n = calibrated({1: profiles(data["units"]), **{int(n): profiles(us) for n, us in data["smaller"].items()}},
                      {int(n): s for n, s in data.get("end_to_end", {}).items()})  # fmt: skip
    link = Link(data["link"]["bandwidth"], data["link"]["latency"])
    names = [r["name"] for r in data["rows"]]
    return predicted_ratios(names, data["batch_size"], by_n.pop(1), data["cuts"], link, data["modules"], by_n)


def kendall(a: Sequence[float], b: Sequence[float]) -> tuple[float, list[tuple[int, int]]]:
    """Kendall's tau between two orderings, and the pairs they order differently."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    wrong = [(i, j) for i, j in pairs if (a[i] - a[j]) * (b[i] - b[j]) < 0]
    return 1 - 2 * len(wrong) / max(1, len(pairs)), wrong


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modules", type=int, default=2, help="K: devices (processes) per contender")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", default=None, help="run these contenders only (names as in the table)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", default="bp", help=argparse.SUPPRESS)
    p.add_argument("--split-points", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    from replay_opt.cut.balance import profile, step_seconds
    from replay_opt.cut.units import balanced_starts
    from replay_opt.plan import Link, best_fr_cut, calibrated

    k = args.modules
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args.model).to(args.device)

    def example_at(batch: int) -> tuple[torch.Tensor]:
        return (example_batch(args.model, batch, torch.Generator().manual_seed(1))[0].to(args.device),)

    def profile_at(batch: int, split_backward: bool = False) -> list[Any]:
        return profile(model, example_at(batch), repeats=5, split_backward=split_backward)

    units = profile_at(args.batch_size)
    names = [u.name for u in units]
    common = ["--worker", "--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--device", args.device]  # fmt: skip
    # Each contender on the cut that balances its own device time (the link is measured next): FR's
    # module 1 also replays; every other pipeline balances forward + backward.
    # (The hand-built stages begin at their own units only: blocks, say, not inside the embeddings.)
    hand = set(_named_units(model)[0])
    allowed = [u.name in hand for u in units]
    work = [u.forward_s + u.backward_s for u in units]
    cuts = {"fr": best_fr_cut(units, k, Link(1e12, 0.0)), "others": balanced_starts(work, k, allowed),
            "two per rank": balanced_starts(work, 2 * k, allowed)}  # fmt: skip
    boundary = max(units[i - 1].output_bytes for starts in cuts.values() for i in starts)
    measured_link = launch("bench.peers", [*common, "--contender", "link", "--bytes", str(boundary)], 2, 1, "link")
    link = Link(measured_link["bandwidth"], measured_link["latency"])
    splits = {key: ",".join(names[i] for i in starts) for key, starts in cuts.items()}

    names_run = args.only or contenders(k, args.microbatches)
    if any(n.startswith("torchgpipe") for n in names_run) and not _importable("torchgpipe"):
        print("torchgpipe is not installed (pip install torchgpipe): left out")
        names_run = [n for n in names_run if not n.startswith("torchgpipe")]
    # What a micro-batch and a DDP replica's share really cost (the planner scales by 1/n without these).
    fractions = {k, *(int(n.split(":")[1]) for n in names_run if ":" in n)}
    smaller = {n: profile_at(args.batch_size // n, split_backward=n != k) for n in sorted(fractions)
               if args.batch_size // n >= 1}  # fmt: skip  (the micro-batches' with the zero-bubble split)
    # ... each scaled to the whole model's step on its batch, timed end to end (``replay_opt.plan.calibrated``).
    seconds = step_seconds(model, {n: example_at(args.batch_size // n) for n in [1, *smaller]})
    profiles = calibrated({1: units, **smaller}, seconds)
    samples: dict[str, list[float]] = {n: [] for n in names_run}
    peaks: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for name in names_run:
            if name in failed:
                continue
            processes = 1 if name.split(":")[0] in ONE_PROCESS else k
            cmd = [*common, "--contender", name, "--split-points", splits[cut_of(name)]]
            try:
                out = launch("bench.peers", cmd, processes, 1, name)
            except RuntimeError as exc:
                failed[name] = str(exc)
                continue
            samples[name].append(out["samples_per_s"])
            peaks[name] = out["peak_bytes"]
    base = statistics.median(samples["bp"]) if samples.get("bp") else float("nan")
    predicted = predicted_ratios(names_run, args.batch_size, profiles[1], cuts, link, k,
                                 {n: us for n, us in profiles.items() if n > 1})  # fmt: skip
    rows = []
    for name in names_run:
        if name in failed:
            rows.append({"name": name, "failed": failed[name]})
            continue
        got = statistics.median(samples[name])
        rows.append({"name": name, "samples_per_s": got, "ratio": got / base,
                     "predicted_samples_per_s": predicted[name][0], "predicted_ratio": predicted[name][1],
                     "peak_mib": [p / 2**20 for p in peaks[name]], "rounds": samples[name]})  # fmt: skip
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"{args.model}, batch {args.batch_size}, K={k} split at {splits['fr']} (FR), {splits['others']} (the others); "
        f"{device}, 1 thread per process; "
        f"link {link.bandwidth:.3g} B/s, {link.latency:.1e} s (measured); median of {args.rounds} rounds"
    )
    print("| contender | samples/s | ratio to BP, 1 device | predicted ratio | peak MiB per rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['name']} | failed: {r['failed']} | | | |")
            continue
        peak = " / ".join(f"{p:.0f}" for p in r["peak_mib"])
        print(f"| {r['name']} | {r['samples_per_s']:.1f} | {r['ratio']:.2f} | {r['predicted_ratio']:.2f} | {peak} |")
    ok = [r for r in rows if "failed" not in r]
    tau, wrong = kendall([r["ratio"] for r in ok], [r["predicted_ratio"] for r in ok])
    print(
        f"ranking: Kendall tau {tau:.2f} between predicted and measured "
        f"({len(wrong)} of {len(ok) * (len(ok) - 1) // 2} pairs ordered differently"
        + (": " + ", ".join(f"{ok[i]['name']} vs {ok[j]['name']}" for i, j in wrong) if wrong else "")
        + ")"
    )
    if args.json:
        with open(args.json, "w") as f:
            # (the profiles and cuts too: ``bench.regime --from-json`` predicts again from them with today's planner)
            json.dump({"link": measured_link, "split_points": splits["fr"], "split_points_others": splits["others"],
                       "rows": rows, "kendall_tau": tau, "batch_size": args.batch_size, "modules": k,
                       "cuts": cuts, "units": [asdict(u) for u in units],
                       "smaller": {n: [asdict(u) for u in us] for n, us in smaller.items()},
                       "end_to_end": seconds}, f, indent=2)  # fmt: skip


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
