"""One process per module: torch.distributed stages, data-parallel replicas, and their messages.

Under ``accelerate launch --num_processes W`` (or ``torchrun``) with a ``ReplayModelWrapper``
of K modules, W = K x D: the ranks of replica d are ``d*K .. d*K+K-1`` (consecutive, so a
pipeline stays inside a node when K divides the GPUs per node, and only the gradient
all-reduce crosses nodes).  The replica's *first* rank runs the **last** module and the next
ranks run modules 1, 2, ..., K-1: so rank 0, Accelerate's main process, holds the real
output, the real loss and the metrics -- what ``loss.item()``, ``accelerator.log`` and a
progress bar on the main process show.  The ranks that run the same module in different
replicas form that module's data-parallel group.

Between two ranks of a pipeline there is one ordered channel per direction.  Everything
one sends the other travels on it, in order: the activations of a training step or of an
evaluation forward, the stale gradient, "step discarded", the tied weights' gradients, and
the *sync* messages of collective points (a barrier, a state dict, a metric, exiting).
Every message starts with a header that says what the sender is doing (kind, its training
step, evaluation forward and optimizer step counters, the batch size, and for the first
steps a fingerprint of its batch), so a receiver that expects something else stops at once
with an error naming both sides -- ranks that evaluate while others train, iterate other
batches, skip ``optimizer.step()``, or reach a barrier alone -- instead of mixing them up or
waiting forever.  Tensors follow their header with ``isend``/``irecv`` on the default
process group (NCCL on GPUs, device to device; gloo on CPU); headers go on a gloo group.
Every wait is bounded by ``timeout``; a peer that died or stopped answering raises a
``PipelineError`` that says which rank and what was awaited.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

HEADER_WORDS = 512
_MAGIC = 0x5E71A7
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip
_TENSOR, _NONE, _INT, _FLOAT, _BOOL = 0, 1, 2, 3, 4


class PipelineError(RuntimeError):
    """A neighbour rank failed, stopped answering, or the ranks disagree."""


class Kind(IntEnum):
    """What a message is; its header's first word after the magic number."""

    ACTIVATIONS = 1  # module s -> s+1, training step
    EVAL = 2  # module s -> s+1, evaluation forward
    GRADIENT = 3  # module s -> s-1, the stale gradient of the previous step
    DROPPED = 4  # module s -> s-1, that step was discarded (zero_grad without step): no gradient
    TIED = 5  # a tied parameter's gradient, between the modules that share it
    SYNC = 6  # a collective point; ``op`` says which


class Op(IntEnum):
    """Collective points that all ranks of a pipeline must reach together."""

    BARRIER = 1  # accelerator.wait_for_everyone()
    STATE = 2  # a state dict (model or optimizer: collective)
    METRIC = 3  # a metric summed or gathered from the last modules
    EXIT = 4  # the process is ending


DOING = {
    Kind.ACTIVATIONS: "training (a training-mode forward)",
    Kind.EVAL: "evaluating (a forward in eval mode or under torch.no_grad())",
    Kind.GRADIENT: "finishing a training step (sending its gradient)",
    Kind.DROPPED: "finishing a discarded training step",
    Kind.TIED: "exchanging tied weights' gradients (optimizer.step())",
}
POINTS = {
    Op.BARRIER: "accelerator.wait_for_everyone()",
    Op.STATE: "a state dict (accelerator.save_state / save_model / model.state_dict(): collective)",
    Op.METRIC: "a metric from the last modules (accelerator.gather / reduce / sum_over_last_modules: collective)",
    Op.EXIT: "the end of the script",
}
OPS = {
    Op.BARRIER: "waiting at accelerator.wait_for_everyone()",
    Op.STATE: "collecting a state dict (accelerator.save_state / save_model / model.state_dict())",
    Op.METRIC: "combining a metric from the last modules (accelerator.gather / reduce / sum_over_last_modules)",
    Op.EXIT: "exiting (its script ended)",
}


@dataclass(frozen=True)
class Header:
    kind: Kind
    op: int = 0  # Op for SYNC
    tick: int = 0  # training forwards so far
    evals: int = 0  # evaluation forwards so far
    steps: int = 0  # optimizer steps so far
    batch: int = 0
    fingerprint: float = 0.0  # of the batch, for the first steps (0: not checked)

    def doing(self) -> str:
        if self.kind == Kind.SYNC:
            return OPS.get(Op(self.op), "at a collective point")
        what = DOING[self.kind]
        return f"{what}, at training step {self.tick}, evaluation forward {self.evals}, optimizer step {self.steps}"


@dataclass(frozen=True)
class Layout:
    """Who runs what: replica d holds ranks d*K..d*K+K-1; its first rank runs the last module."""

    world_size: int
    rank: int
    num_modules: int

    @property
    def replicas(self) -> int:
        return self.world_size // self.num_modules

    @property
    def stage(self) -> int:
        return (self.rank % self.num_modules - 1) % self.num_modules

    @property
    def replica(self) -> int:
        return self.rank // self.num_modules

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.num_modules + (stage + 1) % self.num_modules

    @property
    def peers(self) -> list[int]:
        """The other modules of this rank's pipeline (stage numbers)."""
        return [s for s in range(self.num_modules) if s != self.stage]

    def describe(self) -> str:
        rows = [
            f"pipeline layout: {self.world_size} ranks = {self.num_modules} modules x {self.replicas} replicas "
            "(each replica's first rank runs the last module: the real loss and metrics are on rank 0)"
        ]
        for d in range(self.replicas):
            ranks = ", ".join(f"module {s + 1}: rank {self.rank_of(s, d)}" for s in range(self.num_modules))
            rows.append(f"  replica {d}: {ranks}")
        return "\n".join(rows)


def pipeline_layout(num_modules: int, timeout: float | None = None) -> Layout | None:
    """The layout for this process, or None when not running distributed (or world size 1).

    Launched by torchrun (``WORLD_SIZE`` > 1) with no process group yet and no Accelerate,
    the process group is created here, bounded by ``timeout``.
    """
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and "MASTER_ADDR" in os.environ
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend, **kwargs)
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
            self.transport._wait(self.work, self.peer, self.what)
        header, values = decode(self.words, self.transport.device, self.peer)
        self.transport._receive_payload(values, self.peer, self.what)
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
        self.tick = 0  # set by the pipeline
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
        with self._guard(f"sending to rank {peer}", peer):
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
        with self._guard(f"receiving {what}", peer):
            work = dist.irecv(words, peer, group=self.meta)
        return PendingRecv(self, work, words, peer, what)

    def _receive_payload(self, values: tuple[Any, ...], peer: int, what: str) -> None:
        for t in values:
            if isinstance(t, torch.Tensor):
                with self._guard(f"receiving {what}", peer):
                    request = dist.irecv(t, peer, group=self.data)
                self._wait(request, peer, what)

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

    def prune(self) -> None:
        """Release the sends of two training steps ago and older (their receivers have taken them)."""
        old = [entry for entry in self._in_flight if entry[0] <= self.tick - 2]
        self._in_flight = [entry for entry in self._in_flight if entry[0] > self.tick - 2]
        for _, work, _ in old:
            with self._guard("waiting for an old send to complete"):
                work.wait(self.timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait (bounded) until every posted send has gone out."""
        limit = self.timeout if timeout is None else datetime.timedelta(seconds=timeout)
        for _, work, _ in self._in_flight:
            with self._guard("waiting for a send to complete"):
                work.wait(limit)
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
        with self._guard("averaging gradients over the replicas (all-reduce)"):
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
        with self._guard("broadcasting buffers over the replicas"):
            for b in buffers:
                dist.broadcast(b, src=src, group=self.stage_group)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (CPU, picklable), on every rank; collective, bounded by the timeout."""
        out: list[Any] = [None] * self.layout.world_size
        with self._guard("collecting a state dict or metric from every rank (collective: every process must call it)"):
            dist.all_gather_object(out, obj, group=self.meta)
        return out

    def all_reduce(self, value: torch.Tensor, what: str, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        out = value.detach().cpu().clone()
        with self._guard(what):
            dist.all_reduce(out, op=op, group=self.meta)
        return out

    def barrier(self) -> None:
        with self._guard("waiting at the barrier of all ranks"):
            dist.monitored_barrier(group=self.meta, timeout=self.timeout, wait_all_ranks=True)


# --------------------------------------------------------------------------- headers


def encode(header: Header, values: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A fixed-size int64 header describing ``values``, and the tensors to send after it."""
    words: list[int] = [
        _MAGIC, int(header.kind), int(header.op), header.tick, header.evals, header.steps, header.batch,
        _float_bits(header.fingerprint), len(values),
    ]  # fmt: skip
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
            words += [_FLOAT, _float_bits(v)]
        else:
            raise TypeError(f"cannot send a {type(v).__name__} between modules; a module may pass tensors, "
                            "None, bool, int and float to the next")  # fmt: skip
    if len(words) > HEADER_WORDS:
        raise ValueError(f"a module passes too many values to the next ({len(values)})")
    return torch.tensor(words + [0] * (HEADER_WORDS - len(words)), dtype=torch.int64), tensors


def decode(words_tensor: torch.Tensor, device: torch.device, peer: int) -> tuple[Header, tuple[Any, ...]]:
    """The header, and empty tensors (to receive into) and plain values, as described by it."""
    words = words_tensor.tolist()
    if words[0] != _MAGIC:
        raise PipelineError(f"a message from rank {peer} is not a replay_opt header: is another library using "
                            "point-to-point messages between the same ranks?")  # fmt: skip
    header = Header(Kind(words[1]), words[2], words[3], words[4], words[5], words[6], _bits_float(words[7]))
    count, i = words[8], 9
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
            values.append(_bits_float(words[i + 1]))
            i += 2
    return header, tuple(values)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def fingerprint(tensors: Sequence[Any]) -> float:
    """A number that differs, almost surely, between two different batches (position-weighted sum).

    Only integer inputs count (token ids, labels, masks): floating inputs may be augmented on each
    rank with its own random draws, and only module 1 uses them.
    """
    total = 0.0
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.numel() and not (t.is_floating_point() or t.is_complex()):
            flat = t.detach().reshape(-1).to("cpu", torch.float64)
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(9973).add_(i + 1)
            total += float((flat * weights).sum())
    return total
