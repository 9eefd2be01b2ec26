"""One training step on this rank, per kind of method: what ``model(x)`` does, and what finishing it sends.

``make_training_step(rank)`` picks one, once:

* ``ReplicaStep`` -- K=1, data-parallel replicas only: the method as in one process;
* ``StaleStep`` -- ``"fr"`` / ``"ddg"``: advance this module, post the activations up, take the
  stale gradient module s+1 sent for the previous step; finishing sends this step's input
  gradient down (the next step's stale gradient of module s-1);
* ``ExactStep`` -- ``"bp"``: naive model parallelism; inside ``loss.backward()`` this rank waits
  (bounded) for the gradient of its output and sends its input's gradient down at once;
* ``MicrobatchedStep`` -- ``"gpipe"`` / ``"1f1b"``: the library's schedules in two phases
  (``schedules.py``): forward-only now, the training pass when the step is finished.

Each ``forward(call)`` returns a ``Started`` step: the output to return (the real one on the last
module, placeholders elsewhere), the ``StaleGradients`` that ``loss.backward()`` delivers, and
whether module s-1 waits for a gradient when the step is finished; ``finish(discarded)`` returns
the values to send down then.  They use the rank's messaging (``Rank.header``, ``receive_input``,
``recv``, ``check_same_step``, ``placeholder``) and its ``transport``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..cut.capture import Call
from ..methods.base import as_leaves
from ..methods.bp import Backprop, GPipe
from ..methods.history import to_device
from ..methods.join import StaleGradients
from ..methods.stale import StaleGradientMethod, grads_of
from . import rng
from .schedules import Microbatched
from .wire import Kind

Rank = Any  # the ``Rank`` of ``rank.py``, which builds its step (not imported: rank.py imports this file)


@dataclass
class Started:
    output: Any  # what model(x) returns on this rank
    pending: StaleGradients  # delivered by loss.backward()
    sends_down: bool = False  # module s-1 waits for this step's input gradient


def _noop() -> None:
    pass


def make_training_step(rank: Rank) -> ReplicaStep | StaleStep | ExactStep | MicrobatchedStep:
    """The step kind for the rank's method and layout."""
    if rank.layout.num_modules == 1:
        return ReplicaStep(rank)
    if isinstance(rank.method, GPipe):
        return MicrobatchedStep(rank)
    if isinstance(rank.method, Backprop):
        return ExactStep(rank)
    return StaleStep(rank)


class ReplicaStep:
    """K=1: the whole model on every rank, replicas averaging gradients at ``step()``."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank

    def forward(self, call: Call) -> Started:
        return Started(self.rank.method.forward(call.inputs), StaleGradients([], [], on_backward=_noop))

    def finish(self, discarded: bool) -> tuple[Any, ...]:
        return ()


class StaleStep:
    """Features Replay / DDG: every module's backward runs at once, on last step's gradient from above."""

    def __init__(self, rank: Rank) -> None:
        assert isinstance(rank.method, StaleGradientMethod)
        self.rank = rank
        self.method: StaleGradientMethod = rank.method

    def forward(self, call: Call) -> Started:
        rank, m = self.rank, self.method
        s, k = rank.layout.stage, rank.layout.num_modules
        restored = m.restored
        _, discarded = m.begin_step()
        header = rank.training_header(call)
        x = rank.receive_input(Kind.ACTIVATIONS, call, header, "the activations of a training step")
        sends_down = s > 0 and rank.ticks >= k - s - 1  # module s-1 expects a message after this step
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        if s < k - 1:

            def send_up_then_receive(played: tuple[Any, ...], due: bool) -> Any:
                # Post the activations first, so module s+1 can start while this rank waits.
                rank.send_activations(header, played)
                grads_in = restored[s] if restored is not None else None
                if restored is None and due:
                    got, values = rank.recv(s + 1, (Kind.GRADIENT, Kind.DROPPED), "the stale gradient")
                    grads_in = values if got.kind == Kind.GRADIENT else None
                return None if discarded else grads_in

            m.step_module(s, x, send_up_then_receive, outputs, grads)
            out = rank.placeholder(call, requires_grad=True)
        else:
            out = m.run_last(x)
            rank.send_stream_state(call.batch_size())  # the state one process has when the step ends
        m.account()
        return Started(out, StaleGradients(outputs, grads, on_backward=_noop), sends_down)

    def finish(self, discarded: bool) -> tuple[Any, ...]:
        rank = self.rank
        if rank.layout.stage < rank.layout.num_modules - 1:
            rank.adopt_stream_state()  # (module K's, sent after its forward)
        return () if discarded else self.method.input_gradients(rank.layout.stage)


class ExactStep:
    """``method="bp"``: the forward goes up through every module in turn; the backward comes down."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank

    def forward(self, call: Call) -> Started:
        rank = self.rank
        s, k, batch = rank.layout.stage, rank.layout.num_modules, call.batch_size()
        header = rank.training_header(call)
        x = rank.receive_input(Kind.ACTIVATIONS, call, header, "the activations of a training step")
        x = as_leaves(x) if s > 0 else x
        out = rank.method.run_stage(rank.stage, x)

        def send_down() -> None:  # the end of this rank's backward: module s-1 is waiting for it
            if s > 0:  # (with the generator state after module K, which every module then continues from)
                down = (*grads_of(x), *rng.state(rank.device))
                rank.transport.send(s - 1, rank.header(Kind.GRADIENT, batch), down)

        if s == k - 1:
            return Started(out, StaleGradients([], [], on_backward=send_down))
        rank.send_activations(header, out)
        wired = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.requires_grad]

        def output_gradient() -> list[torch.Tensor | None]:
            _, values = rank.recv(s + 1, Kind.GRADIENT, "the gradient of this step's output (method='bp')")
            values, state = rng.split(values)
            rng.adopt(state, rank.device)
            return [values[i] for i in wired]

        exact = StaleGradients([out[i] for i in wired], output_gradient, on_backward=send_down)
        return Started(rank.placeholder(call, requires_grad=True), exact)

    def finish(self, discarded: bool) -> tuple[Any, ...]:
        return ()


class MicrobatchedStep:
    """``method="gpipe"``/``"1f1b"``: the schedule's forward-only pass now, its training pass when the step
    is finished.  A header first, so ranks at different steps or on different batches stop with the same
    errors as the other methods."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        method = rank.method
        assert isinstance(method, GPipe)
        layout = rank.layout
        group, ranks = rank.transport.pipeline_group()
        self.micro = Microbatched(
            kind=method.name, microbatches=method.microbatches, stage=rank.stage.train, index=layout.stage,
            num_stages=layout.num_modules, device=rank.device, group=group, stage_ranks=ranks,
        )  # fmt: skip

    def forward(self, call: Call) -> Started:
        rank = self.rank
        s, k = rank.layout.stage, rank.layout.num_modules
        header = rank.training_header(call)
        if s > 0:
            got, _ = rank.recv(s - 1, Kind.ACTIVATIONS, "the start of a training step")
            rank.check_same_step(s - 1, got, header)
        if s < k - 1:
            rank.transport.send(s + 1, header)
        with self._schedule_errors("forward pass"):
            program = rank.stage.program
            inputs = to_device(call.inputs, rank.device) if s == 0 else call.inputs
            out = self.micro.forward((id(program), call.shape_key()), program, inputs, call.batch_size())
        if s < k - 1:
            out = rank.placeholder(call, requires_grad=True)
        # (only to see that backward() reached the output)
        return Started(out, StaleGradients([], [], on_backward=_noop))

    def finish(self, discarded: bool) -> tuple[Any, ...]:
        with self._schedule_errors("training pass"):
            self.micro.finish(discarded)
        return ()

    @contextlib.contextmanager
    def _schedule_errors(self, what: str) -> Iterator[None]:
        """The library wraps a module's own error in a RuntimeError: raise that error; a failed or silent peer
        becomes a PipelineError naming it (bounded by ``timeout``, as every wait here)."""
        try:
            yield
        except RuntimeError as exc:
            cause = exc.__cause__
            if not _lost_peer(exc) and (cause is None or not _lost_peer(cause)):
                if cause is not None:
                    raise cause from None  # the model's own error, which the library wrapped
                raise
            with self.rank.transport.guard(f"in the {self.rank.method.name} schedule's {what}"):
                raise


def _lost_peer(exc: BaseException) -> bool:
    """Whether an error of torch.distributed.pipelining comes from the communication (a peer that failed or
    timed out) rather than from the model."""
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        w in text for w in ("timed out", "timeout", "connection", "gloo", "nccl", "peer")
    )
