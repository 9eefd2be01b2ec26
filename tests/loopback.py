"""A pipeline of threads: K ranks in this process, joined by a loopback transport.

``LoopbackTransport`` is ``replay_opt.multiprocess.transport.Transport`` with its channels and
collectives between threads (queues and a barrier) instead of torch.distributed: every message
goes through the real wire format (``wire.encode`` / ``decode``), and everything above the
transport -- ``Rank``, the step kinds, collectives, checkpoints -- is the library's own.  So the
per-rank step logic runs in the fast test set, in milliseconds; the real gloo process groups are
tested by ``test_distributed.py`` / ``test_accelerate_pipeline.py``.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.multiprocess import registry
from replay_opt.multiprocess.layout import Layout
from replay_opt.multiprocess.rank import Rank
from replay_opt.multiprocess.transport import Transport
from replay_opt.multiprocess.wire import Header, PipelineError, decode, encode


class Hub:
    """The channels and the collective meeting point of ``world`` ranks."""

    def __init__(self, world: int, timeout: float) -> None:
        self.world = world
        self.channels = {(a, b): queue.Queue() for a in range(world) for b in range(world) if a != b}
        self.meeting = threading.Barrier(world, timeout=timeout)
        self.slots: list[Any] = [None] * world


class LoopbackTransport(Transport):
    def __init__(self, hub: Hub, layout: Layout, timeout: float) -> None:  # (no process groups)
        self.hub, self.layout, self.device = hub, layout, torch.device("cpu")
        self.timeout = datetime.timedelta(seconds=timeout)
        self.meta = self.stage_group = self.data = None
        self.tick = 0
        self._in_flight: list[Any] = []

    def send(self, to_stage: int, header: Header, values: Sequence[Any] = ()) -> None:
        peer = self.layout.rank_of(to_stage)
        words, tensors = encode(header, values)  # the real wire format, both ways
        got, received = decode(words, self.device, self.layout.rank)
        it = iter(t.detach().clone() for t in tensors)
        received = tuple(next(it) if isinstance(v, torch.Tensor) else v for v in received)
        self.hub.channels[(self.layout.rank, peer)].put((got, received))

    def recv(self, from_stage: int, what: str) -> tuple[Header, tuple[Any, ...]]:
        peer = self.layout.rank_of(from_stage)
        try:
            return self.hub.channels[(peer, self.layout.rank)].get(timeout=self.timeout.total_seconds())
        except queue.Empty:
            raise PipelineError(
                f"rank {self.layout.rank} gave up waiting for {what}: rank {peer} sent nothing"
            ) from None

    def new_step(self, tick: int) -> None:
        self.tick = tick

    def flush(self, timeout: float | None = None) -> None:
        pass

    def gather_objects(self, obj: Any) -> list[Any]:
        hub = self.hub
        try:
            hub.slots[self.layout.rank] = obj
            hub.meeting.wait()
            out = list(hub.slots)
            hub.meeting.wait()
        except threading.BrokenBarrierError:
            raise PipelineError(f"rank {self.layout.rank}: a collective that not every rank reached") from None
        return out

    def all_reduce(self, value: torch.Tensor, what: str, op: Any = torch.distributed.ReduceOp.SUM) -> torch.Tensor:
        parts = [v.to(torch.float64) for v in self.gather_objects(value.detach().cpu().clone())]
        total = torch.stack(parts).amax(0) if op == torch.distributed.ReduceOp.MAX else torch.stack(parts).sum(0)
        return total.to(value.dtype)

    def barrier(self) -> None:
        self.gather_objects(None)


def threaded_pipeline(
    make_model: Callable[[], torch.nn.Module],
    k: int,
    *,
    method: str = "fr",
    split_points: list[str] | None = None,
    timeout: float = 20.0,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
) -> list[tuple[ReplayModelWrapper, ReplayOptimizer]]:
    """K (wrapper, optimizer) pairs, rank r's running module ``(r - 1) % K`` as under ``accelerate launch``.
    ``make_model`` must build the same model each time (seeded)."""
    hub = Hub(k, timeout)
    pairs = []
    for r in range(k):
        wrapper = ReplayModelWrapper(make_model(), num_modules=k, method=method, split_points=split_points)
        layout = Layout(world_size=k, rank=r, num_modules=k)
        wrapper.rank = Rank(
            stages=wrapper.partition.stages, method=wrapper.algorithm, layout=layout, device=torch.device("cpu"),
            timeout=timeout, model=wrapper.module, transport=LoopbackTransport(hub, layout, timeout),
        )  # fmt: skip
        inner = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))(wrapper.parameters())
        pairs.append((wrapper, ReplayOptimizer(inner, wrapper)))
    return pairs


def run_ranks(pairs: list[Any], body: Callable[[int, Any, Any], Any], timeout: float = 60.0) -> list[Any]:
    """``body(rank, wrapper, optimizer)`` on one thread per rank; the results, or the exceptions raised."""
    results: list[Any] = [None] * len(pairs)

    def run(r: int) -> None:
        wrapper, opt = pairs[r]
        try:
            for program in wrapper.partition.programs():  # captured before the rank was attached
                wrapper.rank.on_new_program(program, wrapper.split_points)
            results[r] = body(r, wrapper, opt)
        except BaseException as exc:
            results[r] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    registry.forget_all()  # (these ranks must not stay active for the rest of the test session)
    return results
