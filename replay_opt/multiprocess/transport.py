"""The ordered channels between this rank and the other modules of its pipeline, and the collectives.

Headers (``wire.py``) go on a gloo group; tensors follow their header with ``isend``/``irecv``
on the default process group (NCCL on GPUs, device to device; gloo on CPU).  Every wait is
bounded by ``timeout``; a peer that died or stopped answering raises a ``PipelineError`` that
says which rank and what was awaited.  This is the only file that calls torch.distributed's
point-to-point and collective operations for the per-rank step; ``rank.py`` talks to it through
``send`` / ``recv`` / ``post_recv``, the collectives below, and ``guard``.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .layout import Layout
from .wire import HEADER_WORDS, Header, PipelineError, decode, encode


@dataclass
class PendingRecv:
    """A posted receive of a header.  (Wait on it once: a second ``wait()`` on a gloo receive blocks.)"""

    transport: Transport
    work: Any
    words: torch.Tensor
    peer: int
    what: str

    def result(self) -> tuple[Header, tuple[Any, ...]]:
        if not self.work.is_completed():
            self.transport.wait(self.work, self.peer, self.what)
        header, values = decode(self.words, self.transport.device, self.peer)
        self.transport.receive_payload(values, self.peer, self.what)
        return header, values


class Transport:
    """The ordered channels between this rank and the other modules of its pipeline, plus collectives."""

    def __init__(self, layout: Layout, device: torch.device, timeout: float) -> None:
        self.layout = layout
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.meta = dist.new_group(backend="gloo", timeout=self.timeout)
        self.stage_group = None
        for s in range(layout.num_modules):
            ranks = [layout.rank_of(s, d) for d in range(layout.replicas)]
            group = dist.new_group(ranks=ranks, timeout=self.timeout) if layout.replicas > 1 else None
            if s == layout.stage:
                self.stage_group = group
        # Send requests and what they send (kept alive until done), with the training step they belong to.
        # gloo's requests report completion only once waited on, so they are waited on (instantly, by
        # then) two steps later, when the peer has surely taken them.
        self._in_flight: list[tuple[int, Any, Any]] = []
        self.tick = 0  # the training step of what is sent now (``new_step``)
        # Tensors travel on the default group (NCCL: device to device) unless they are on the CPU, where
        # they follow their header on the same gloo group.
        self.data = self.meta if device.type == "cpu" else None

    def pipeline_group(self) -> tuple[Any, dict[int, int]]:
        """A process group of this replica's K ranks, for torch.distributed.pipelining, and each module's rank
        in it.  Collective: every rank creates every replica's group, in order."""
        k, mine = self.layout.num_modules, None
        for d in range(self.layout.replicas):
            group = dist.new_group(ranks=[self.layout.rank_of(s, d) for s in range(k)], timeout=self.timeout)
            if d == self.layout.replica:
                mine = group
        return mine, {s: dist.get_group_rank(mine, self.layout.rank_of(s)) for s in range(k)}

    # ----------------------------------------------------------------------- point to point

    def send(self, to_stage: int, header: Header, values: Sequence[Any] = ()) -> None:
        """Post a message to module ``to_stage`` of this replica; do not wait."""
        peer = self.layout.rank_of(to_stage)
        words, tensors = encode(header, values)
        with self.guard(f"sending to rank {peer}", peer):
            self._in_flight.append((self.tick, dist.isend(words, peer, group=self.meta), words))
            for t in tensors:
                t = t.detach().contiguous()
                self._in_flight.append((self.tick, dist.isend(t, peer, group=self.data), t))

    def recv(self, from_stage: int, what: str) -> tuple[Header, tuple[Any, ...]]:
        """Wait (bounded) for the next message from ``from_stage`` of this replica."""
        return self.post_recv(from_stage, what).result()

    def post_recv(self, from_stage: int, what: str = "a message") -> PendingRecv:
        """Start receiving the next message from ``from_stage``; ``result()`` completes it."""
        peer = self.layout.rank_of(from_stage)
        words = torch.empty(HEADER_WORDS, dtype=torch.int64)
        with self.guard(f"receiving {what}", peer):
            work = dist.irecv(words, peer, group=self.meta)
        return PendingRecv(self, work, words, peer, what)

    def receive_payload(self, values: tuple[Any, ...], peer: int, what: str) -> None:
        for t in values:
            if isinstance(t, torch.Tensor):
                with self.guard(f"receiving {what}", peer):
                    request = dist.irecv(t, peer, group=self.data)
                self.wait(request, peer, what)

    def mismatch(self, from_stage: int, got: Header, what: str, mine: str | None = None) -> PipelineError:
        peer = self.layout.rank_of(from_stage)
        me = f"rank {self.layout.rank} (module {self.layout.stage + 1})"
        return PipelineError(
            f"{me} is {mine or 'waiting for ' + what}, but rank {peer} (module {from_stage + 1}) is {got.doing()}. "
            "With one process per module every process must do the same thing at the same time: run every "
            "forward (training and evaluation) on every process, call optimizer.step() / optimizer.zero_grad() on "
            "every process, give every process the same batches (prepare the data loader with "
            "accelerator.prepare after wrapping the model), and reach wait_for_everyone() / save_state() / "
            "state_dict() together. See docs/distributed.md."
        )

    def new_step(self, tick: int) -> None:
        """Training step ``tick`` begins: release the sends of two training steps ago and older (their receivers
        have taken them)."""
        self.tick = tick
        old = [entry for entry in self._in_flight if entry[0] <= self.tick - 2]
        self._in_flight = [entry for entry in self._in_flight if entry[0] > self.tick - 2]
        for _, work, _ in old:
            with self.guard("waiting for an old send to complete"):
                work.wait(self.timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait (bounded) until every posted send has gone out."""
        limit = self.timeout if timeout is None else datetime.timedelta(seconds=timeout)
        for _, work, _ in self._in_flight:
            with self.guard("waiting for a send to complete"):
                work.wait(limit)
        self._in_flight.clear()

    def wait(self, work: Any, peer: int | None, what: str) -> None:
        """Wait (bounded) for a posted operation with ``peer`` (None: a collective)."""
        with self.guard(f"waiting for {what}", peer):
            work.wait(self.timeout)

    @contextlib.contextmanager
    def guard(self, doing: str, peer: int | None = None) -> Iterator[None]:
        """Turn a failed or timed-out communication into a PipelineError that says who and what."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, PipelineError):
                raise
            me = f"rank {self.layout.rank} (module {self.layout.stage + 1})"
            who = "the other ranks" if peer is None else f"rank {peer}"
            seconds = f"{self.timeout.total_seconds():.0f} s"
            if "timed out" in str(exc).lower():
                message = (
                    f"{me} gave up after {seconds} {doing}: {who} sent nothing -- it is stuck, much slower, or "
                    f"doing something that does not involve {me.split(' (')[0]}. Every process must reach the same "
                    "points (raise ReplayModelWrapper(..., timeout=) for slow steps)."
                )
            else:
                message = (
                    f"{me} lost {who} while {doing}: a process has failed or exited -- see its log, the error is there."
                )
            raise PipelineError(f"{message} ({exc})") from exc

    # ----------------------------------------------------------------------- collectives

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average this module's gradients over its data-parallel replicas (one bucket)."""
        if self.stage_group is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self.guard("averaging gradients over the replicas (all-reduce)"):
            dist.all_reduce(flat, group=self.stage_group)
        flat /= self.layout.replicas
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, buffers: Sequence[torch.Tensor]) -> None:
        """Give every replica of this module replica 0's buffers (BatchNorm statistics), as DDP does."""
        if self.stage_group is None:
            return
        src = self.layout.rank_of(self.layout.stage, replica=0)
        with self.guard("broadcasting buffers over the replicas"):
            for b in buffers:
                dist.broadcast(b, src=src, group=self.stage_group)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (CPU, picklable), on every rank; collective, bounded by the timeout."""
        out: list[Any] = [None] * self.layout.world_size
        with self.guard("collecting a state dict or metric from every rank (collective: every process must call it)"):
            dist.all_gather_object(out, obj, group=self.meta)
        return out

    def all_reduce(self, value: torch.Tensor, what: str, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        out = value.detach().cpu().clone()
        with self.guard(what):
            dist.all_reduce(out, op=op, group=self.meta)
        return out

    def barrier(self) -> None:
        with self.guard("waiting at the barrier of all ranks"):
            dist.monitored_barrier(group=self.meta, timeout=self.timeout, wait_all_ranks=True)
