"""One process per module: torch.distributed stages, data-parallel replicas, and their messages.

Under ``accelerate launch --num_processes W`` (or ``torchrun``) with a
``ReplayModelWrapper`` of K modules, rank r runs module ``r % K`` of replica
``r // K``: W = K x D.  A replica's ranks are consecutive (so a pipeline stays
inside a node when K divides the GPUs per node, and only the gradient all-reduce
crosses nodes); the ranks that run the same module in different replicas form
that module's data-parallel group.

Messages between neighbours are point-to-point: activations go up, stale
gradients go down, with ``isend``/``irecv`` on the default process group (NCCL
on GPUs, so GPU tensors go device to device; gloo on CPU).  Each message is
preceded by a small header (shapes, dtypes, plain Python values) sent on a gloo
group, so the receiver can allocate its buffers; headers carry tags per
direction so the two directions never mix.  Nothing polls: a receiver waits on
the request, with a timeout, and a peer that died or stopped answering raises a
``PipelineError`` that says which rank and what was awaited.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

HEADER_WORDS = 512
TAG_ACTIVATION, TAG_GRADIENT, TAG_EVAL = 1, 2, 3
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip
_TENSOR, _NONE, _INT, _FLOAT, _BOOL = 0, 1, 2, 3, 4


class PipelineError(RuntimeError):
    """A neighbour rank failed, stopped answering, or the ranks disagree."""


@dataclass(frozen=True)
class Layout:
    """Who runs what: rank r is module r % K of replica r // K."""

    world_size: int
    rank: int
    num_modules: int

    @property
    def replicas(self) -> int:
        return self.world_size // self.num_modules

    @property
    def stage(self) -> int:
        return self.rank % self.num_modules

    @property
    def replica(self) -> int:
        return self.rank // self.num_modules

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.num_modules + stage

    def describe(self) -> str:
        rows = [f"pipeline layout: {self.world_size} ranks = {self.num_modules} modules x {self.replicas} replicas"]
        for d in range(self.replicas):
            ranks = ", ".join(f"module {s + 1}: rank {self.rank_of(s, d)}" for s in range(self.num_modules))
            rows.append(f"  replica {d}: {ranks}")
        return "\n".join(rows)


def pipeline_layout(num_modules: int) -> Layout | None:
    """The layout for this process, or None when not running distributed (or world size 1)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()
    if world % num_modules:
        raise ValueError(
            f"world size {world} is not divisible by num_modules={num_modules}: launch K x D processes "
            f"(e.g. --num_processes {num_modules} for one replica, {2 * num_modules} for two)"
        )
    return Layout(world, dist.get_rank(), num_modules)


def local_device() -> torch.device:
    """This rank's device: Accelerate's when it is set up, else LOCAL_RANK's accelerator, else CPU."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return PartialState().device
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class Transport:
    """Messages between this rank and its pipeline neighbours, plus the replica collectives."""

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
        self._in_flight: list[Any] = []  # send requests, and what they send (kept alive until done)

    # ----------------------------------------------------------------------- point to point

    def send(self, values: Sequence[Any], to_stage: int, tag: int, batch: int) -> None:
        """Post ``values`` (tensors and plain Python values) to ``to_stage`` of this replica; do not wait."""
        peer = self.layout.rank_of(to_stage)
        header, tensors = encode(values, batch)
        with self._guard("sending to", peer):
            self._in_flight.append((dist.isend(header, peer, group=self.meta, tag=tag), header))
            for t in tensors:
                t = t.detach().contiguous()
                self._in_flight.append((dist.isend(t, peer, tag=tag), t))

    def recv(self, from_stage: int, tag: int, what: str, batch: int | None = None) -> tuple[Any, ...]:
        """Wait (bounded) for the next message from ``from_stage`` of this replica."""
        peer = self.layout.rank_of(from_stage)
        header = torch.empty(HEADER_WORDS, dtype=torch.int64)
        with self._guard(f"receiving {what}", peer):
            request = dist.irecv(header, peer, group=self.meta, tag=tag)
        self._wait(request, peer, what)
        values, sent_batch = decode(header, self.device)
        if batch is not None and sent_batch != batch:
            raise PipelineError(
                f"rank {self.layout.rank}: module {self.layout.stage + 1} got a batch of {batch} while module "
                f"{from_stage + 1} sent one of {sent_batch}: the ranks of a pipeline must iterate the same batches; "
                "build their data loaders with model.prepare_data_loader(loader), not accelerator.prepare(loader)"
            )
        for t in values:
            if isinstance(t, torch.Tensor):
                with self._guard(f"receiving {what}", peer):
                    request = dist.irecv(t, peer, tag=tag)
                self._wait(request, peer, what)
        return values

    def prune(self) -> None:
        """Forget sends that have completed."""
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]

    def flush(self) -> None:
        """Wait (bounded) until every posted send has gone out."""
        for work, _ in self._in_flight:
            self._wait(work, None, "a send to complete")
        self._in_flight.clear()

    def _wait(self, work: Any, peer: int | None, what: str) -> None:
        with self._guard(f"waiting for {what}", peer):
            work.wait(self.timeout)

    @contextlib.contextmanager
    def _guard(self, doing: str, peer: int | None = None) -> Iterator[None]:
        """Turn a failed or timed-out communication into a PipelineError that says who and what."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, PipelineError):
                raise
            who = "the other ranks" if peer is None else f"rank {peer}"
            raise PipelineError(
                f"rank {self.layout.rank} (module {self.layout.stage + 1}) failed {doing} with {who} (bounded by "
                f"{self.timeout.total_seconds():.0f} s): a process has probably failed or stopped -- see its log. "
                f"({exc})"
            ) from exc

    # ----------------------------------------------------------------------- collectives

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average this module's gradients over its data-parallel replicas (one bucket)."""
        if self.stage_group is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self._guard("averaging gradients over replicas"):
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
        with self._guard("broadcasting buffers over replicas"):
            for b in buffers:
                dist.broadcast(b, src=src, group=self.stage_group)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (CPU, picklable), on every rank; collective, bounded by the timeout."""
        out: list[Any] = [None] * self.layout.world_size
        with self._guard(
            "collecting a state dict (state_dict() of a pipeline-parallel model is collective: call it on every rank)"
        ):
            dist.all_gather_object(out, obj, group=self.meta)
        return out

    def sum_over_last_modules(self, value: torch.Tensor) -> torch.Tensor:
        """Sum, over replicas, of ``value`` as computed on each replica's last module; on every rank."""
        last = self.layout.stage == self.layout.num_modules - 1
        out = value.detach().to(torch.float64).clone() if last else torch.zeros((), dtype=torch.float64)
        out = out.cpu()
        with self._guard("summing a metric over the last modules"):
            dist.all_reduce(out, group=self.meta)
        return out.to(value.dtype if value.is_floating_point() else torch.float64)

    def broadcast_from_last(self, obj: Any) -> Any:
        """``obj`` of replica 0's last module, on every rank (every rank must call this together)."""
        box = [obj]
        with self._guard("sharing the output's shape"):
            dist.broadcast_object_list(box, src=self.layout.rank_of(self.layout.num_modules - 1, 0), group=self.meta)
        return box[0]


# --------------------------------------------------------------------------- headers


def encode(values: Sequence[Any], batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A fixed-size int64 header describing ``values``, and the tensors to send after it."""
    words: list[int] = [batch, len(values)]
    tensors = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype not in _DTYPES:
                raise TypeError(f"cannot send a tensor of dtype {v.dtype} between modules")
            words += [_TENSOR, _DTYPES.index(v.dtype), v.dim(), *v.shape]
            tensors.append(v)
        elif v is None:
            words.append(_NONE)
        elif isinstance(v, bool):
            words += [_BOOL, int(v)]
        elif isinstance(v, int):
            words += [_INT, v]
        elif isinstance(v, float):
            words += [_FLOAT, struct.unpack("<q", struct.pack("<d", v))[0]]
        else:
            raise TypeError(f"cannot send a {type(v).__name__} between modules; a module may pass tensors, "
                            "None, bool, int and float to the next")  # fmt: skip
    if len(words) > HEADER_WORDS:
        raise ValueError(f"a module passes too many values to the next ({len(values)})")
    return torch.tensor(words + [0] * (HEADER_WORDS - len(words)), dtype=torch.int64), tensors


def decode(header: torch.Tensor, device: torch.device) -> tuple[tuple[Any, ...], int]:
    """Empty tensors (to receive into) and plain values, as described by ``header``; and the batch size."""
    words = header.tolist()
    batch, count, i = words[0], words[1], 2
    values: list[Any] = []
    for _ in range(count):
        kind = words[i]
        if kind == _TENSOR:
            dtype, ndim = _DTYPES[words[i + 1]], words[i + 2]
            shape = words[i + 3 : i + 3 + ndim]
            values.append(torch.empty(shape, dtype=dtype, device=device))
            i += 3 + ndim
        elif kind == _NONE:
            values.append(None)
            i += 1
        elif kind == _BOOL:
            values.append(bool(words[i + 1]))
            i += 2
        elif kind == _INT:
            values.append(words[i + 1])
            i += 2
        else:
            values.append(struct.unpack("<d", struct.pack("<q", words[i + 1]))[0])
            i += 2
    return tuple(values), batch
