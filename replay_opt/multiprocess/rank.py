"""This process's part of a pipeline: it runs one module and talks to the others.

A training step on the rank of module s (0-based) of K (``steps.py`` has each method's):

* s > 0 receives this step's activations from module s-1 (checking that both ranks are at
  the same step, optimizer step and batch); module 0 takes the batch;
* s < K-1 advances its module (FR: play, replay; DDG: forward, oldest graph), posts the
  activations to module s+1, then takes the gradient module s+1 sent down for the previous
  step and pairs it with its due output;
* module K-1 runs the batch with a graph and returns the real output;
* the step is *finished* -- the gradient w.r.t. this module's inputs goes down to module s-1
  -- at ``optimizer.step()``, or at the next forward or collective point if the optimizer
  did not step (gradient accumulation), so every ``backward()`` of the step is in it;
* at ``optimizer.step()`` (or ``accelerator.clip_grad_norm_``, whichever comes first) the
  gradients are combined (``collectives.py``);
* the random generator's state travels with the activations, and module K's comes back to
  every module at the end of the step, so dropout draws one process's masks (``rng.py``).

What ``model(x)`` returns on a rank without the last module: zeros shaped like the real output
(``placeholders.py``), wired so that ``loss.backward()`` runs this rank's backward.  The real
values live on the last module's rank -- each replica's first rank, so rank 0 -- and reach
every rank through ``accelerator.gather`` / ``reduce`` / ``gather_for_metrics`` or
``model.sum_over_last_modules`` (``collectives.py``, ``integrations/accelerate.py``).

The ``Rank`` holds the counters every message carries, turns a ``Call`` into messages (a
header, this module's inputs), checks what arrives, and leads the collective points (``sync``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..bypass import engine_running
from ..cut.capture import Call
from ..cut.partition import Program, Stage
from ..methods.base import Method
from ..methods.bp import Backprop
from ..methods.history import detached, to_device
from ..methods.join import StaleGradients, join
from ..methods.stale import StaleGradientMethod
from . import registry, rng
from .collectives import Collectives
from .layout import Layout
from .placeholders import Placeholders
from .steps import make_training_step
from .transport import Transport
from .wire import OPS, POINTS, Header, Kind, Op, PipelineError, fingerprint

FINGERPRINTED_STEPS = 2  # the first training steps (and evaluation forwards) whose batches are compared


class Rank:
    """Module ``layout.stage`` of the pipeline, on ``device``, for ``model`` cut into ``stages``."""

    def __init__(
        self,
        *,
        stages: list[Stage],
        method: Method,
        layout: Layout,
        device: torch.device,
        timeout: float,
        model: torch.nn.Module,
        transport: Any = None,
    ) -> None:
        if layout.num_modules > 1 and not isinstance(method, (StaleGradientMethod, Backprop)):
            raise ValueError(
                f"method={method.name!r} runs in one process; with one process per module use method='fr', "
                "'ddg' or 'bp' (any method works with num_modules=1 and data-parallel replicas)"
            )
        self.layout = layout
        self.method = method
        self.stages = stages
        self.stage = stages[layout.stage]
        self.stage.device = device
        self.device = device
        self.transport = transport if transport is not None else Transport(layout, device, timeout)
        self.placeholder = Placeholders(model, device)
        self.collectives = Collectives(self)
        self.ticks = 0  # training forwards so far, identical on every rank
        self.evals = 0  # evaluation forwards so far
        self.closed = False
        self._pending: StaleGradients | None = None  # the last training step, until it is finished
        self._sends_down = False  # module s-1 expects this step's gradient
        self._batch = 0
        self._early_state: tuple[Any, ...] | None = None  # module K's generator state, arrived ahead (rng.py)
        self._checked_split = False
        self.training_step = make_training_step(self)
        registry.register(self)

    # ----------------------------------------------------------------------- programs

    def on_new_program(self, program: Program, split_points: list[str]) -> None:
        """A program was captured (on every rank at the same forward): place this rank's module, check the cut."""
        program.stages[self.layout.stage].to(self.device)
        if not self._checked_split:
            splits = self.transport.gather_objects(split_points)
            if any(other != split_points for other in splits):
                raise ValueError(
                    f"the ranks cut the model differently ({splits}); with one process per module pass "
                    "split_points=[...] (balance='time' measures on each rank and may disagree)"
                )
            self._checked_split = True
        self.collectives.find_tied(self.stages)

    # ----------------------------------------------------------------------- training

    def train_forward(self, call: Call) -> Any:
        """One training step of this rank's module on ``call`` (``call.inputs``: module 1's inputs)."""
        self.finish_step()
        self.transport.new_step(self.ticks)
        self._batch = call.batch_size()
        if not isinstance(self.method, StaleGradientMethod):  # (those begin their step themselves)
            self.method.new_step()
        started = self.training_step.forward(call)
        self._pending, self._sends_down = started.pending, started.sends_down
        self.ticks += 1
        return join(started.output, started.pending)

    def finish_step(self, only_if_done: bool = False) -> None:
        """Send the last training step's gradient down (or "discarded"); once, at step() or the next forward.
        ``only_if_done``: at a collective point, which may come between a forward and its backward (gathering
        the loss to decide whether to skip the step), leave a step without backward pending."""
        stale = self._pending
        if stale is None:
            return
        discarded = self.method.discarded_last_step()
        if only_if_done and not stale.delivered and not discarded:
            return
        self._pending = None
        if not stale.delivered and not discarded:
            raise RuntimeError(
                f"rank {self.layout.rank} (module {self.layout.stage + 1}): the training step {self.ticks - 1} had no "
                "backward(). Every training-mode forward must be followed by backward(); to skip a step (a NaN loss, "
                "say), call optimizer.zero_grad() before the next forward, on every process -- decide together, from "
                "the real loss of the last module: `if accelerator.gather(loss).isnan().any(): optimizer.zero_grad(); "
                "continue`. For forwards that should not train use model.eval() or torch.no_grad()."
            )
        with engine_running():  # (GPipe's training pass runs the module now)
            down = self.training_step.finish(discarded)
        if not self._sends_down:
            return
        self._sends_down = False
        if discarded:
            self.transport.send(self.layout.stage - 1, self.header(Kind.DROPPED, self._batch))
        else:
            self.transport.send(self.layout.stage - 1, self.header(Kind.GRADIENT, self._batch), down)

    def on_step(self) -> None:
        """The optimizer stepped (or zeroed its gradients)."""
        self.collectives.on_step()

    # ----------------------------------------------------------------------- inference

    def infer(self, call: Call, training: bool) -> Any:
        """A forward without training (eval mode, or no gradients), through every module's rank."""
        self.finish_step()
        s, k = self.layout.stage, self.layout.num_modules
        if k == 1:
            return self.stage.forward(training, *call.inputs)
        header = self.header(Kind.EVAL, call, self.evals < FINGERPRINTED_STEPS)
        x = self.receive_input(Kind.EVAL, call, header, "the activations of an evaluation forward")
        self.evals += 1
        out = self.stage.forward(training, *x)
        if s < k - 1:
            self.transport.send(s + 1, header, out)
            return self.placeholder(call, requires_grad=False)
        return out

    # ----------------------------------------------------------------------- messages

    def header(self, kind: Kind, call: Call | int, fingerprinted: bool = False, op: int = 0) -> Header:
        """What this rank is doing, for a message about ``call`` (or a batch size)."""
        batch = call if isinstance(call, int) else call.batch_size()
        fp = fingerprint(call.leaves) if fingerprinted and isinstance(call, Call) else 0.0
        return Header(kind, op, self.ticks, self.evals, self.method.steps, batch, fp)

    def training_header(self, call: Call) -> Header:
        """The header of this training step's activations (the first steps' batches fingerprinted)."""
        return self.header(Kind.ACTIVATIONS, call, self.ticks < FINGERPRINTED_STEPS)

    def receive_input(self, kind: Kind, call: Call, header: Header, what: str) -> tuple[Any, ...]:
        """This module's inputs: the batch's on module 1, else what module s-1 sent (checked against ``header``);
        a training step's come with module s-1's generator state, which this module continues from."""
        s = self.layout.stage
        if s == 0:
            return to_device(detached(call.inputs), self.device)
        got, values = self.recv(s - 1, kind, what)
        self.check_same_step(s - 1, got, header)
        if kind == Kind.ACTIVATIONS:
            values, state = rng.split(values)
            rng.adopt(state, self.device)
        return values

    def send_activations(self, header: Header, values: tuple[Any, ...]) -> None:
        """A training step's activations to module s+1, with the generator state this module's forward ended at."""
        self.transport.send(self.layout.stage + 1, header, (*values, *rng.state(self.device)))

    def send_stream_state(self, batch: int) -> None:
        """Module K, after its training forward: every other module ends the step at this generator state."""
        state = rng.state(self.device)
        for s in range(self.layout.num_modules - 1):
            self.transport.send(s, self.header(Kind.RNG, batch), state)

    def adopt_stream_state(self) -> None:
        """Finishing a training step (module < K): continue from module K's generator state."""
        state, self._early_state = self._early_state, None
        if state is None:
            _, state = self.recv(self.layout.num_modules - 1, Kind.RNG, "the last module's generator state")
        rng.adopt(state, self.device)

    def recv(self, from_stage: int, expect: Kind | tuple[Kind, ...], what: str) -> tuple[Header, tuple[Any, ...]]:
        """The next message of kind ``expect`` from ``from_stage``; a stale gradient ahead of it is kept."""
        expected = expect if isinstance(expect, tuple) else (expect,)
        while True:
            got, values = self.transport.recv(from_stage, what)
            if got.kind in expected:
                return got, values
            if self._ahead(from_stage, got):
                self._keep(got, values)
                continue
            raise self.transport.mismatch(from_stage, got, what)

    def check_same_step(self, from_stage: int, got: Header, mine: Header) -> None:
        """Stop, naming both ranks, unless ``from_stage`` is at this rank's step, optimizer step and batch."""
        peer, me = self.layout.rank_of(from_stage), f"rank {self.layout.rank} (module {self.layout.stage + 1})"
        if got.kind == Kind.ACTIVATIONS and got.tick != mine.tick:
            raise PipelineError(
                f"{me} is at training step {mine.tick} but rank {peer} sent step {got.tick}: the processes of a "
                "pipeline must run the same number of training forwards (give every process the same batches)"
            )
        if got.kind == Kind.EVAL and got.evals != mine.evals:
            raise PipelineError(
                f"{me} is at evaluation forward {mine.evals} but rank {peer} sent forward {got.evals}: every process "
                "must evaluate the same batches (do not evaluate on the main process only)"
            )
        if got.steps != mine.steps:
            raise PipelineError(
                f"{me} has taken {mine.steps} optimizer steps but rank {peer} has taken {got.steps}: every process "
                "must call optimizer.step() (and optimizer.zero_grad()) after each backward(), not only some of them"
            )
        same_batches = (
            "the ranks of a pipeline must iterate the same batches -- prepare the data loader with "
            "accelerator.prepare(loader) *after* wrapping the model (it is then sharded over replicas, not "
            "processes), or with model.prepare_data_loader(loader)"
        )
        if got.batch != mine.batch:
            raise PipelineError(
                f"{me} got a batch of {mine.batch} while rank {peer} (module {from_stage + 1}) got one of {got.batch}: "
                + same_batches
            )
        if got.fingerprint and mine.fingerprint and got.fingerprint != mine.fingerprint:
            raise PipelineError(
                f"{me} and rank {peer} (module {from_stage + 1}) got different batches: " + same_batches
            )

    def _ahead(self, from_stage: int, got: Header) -> bool:
        """Whether ``got`` may arrive ahead of another message on its channel (a sync, a tied weight's gradient):
        the stale gradient of module s+1, or module K's generator state."""
        stale = got.kind in (Kind.GRADIENT, Kind.DROPPED) and from_stage == self.layout.stage + 1
        return stale or got.kind == Kind.RNG

    def _keep(self, got: Header, values: tuple[Any, ...]) -> None:
        """Keep a message that arrived ahead (``_ahead``) for the point that takes it."""
        if got.kind != Kind.RNG:
            self._keep_early(got, values)
        elif self._early_state is not None:
            raise PipelineError(
                f"rank {self.layout.rank}: two generator states of the last module arrived within one training step"
            )
        else:
            self._early_state = values

    def _keep_early(self, got: Header, values: tuple[Any, ...]) -> None:
        """A stale gradient that arrived ahead of another message on the same channel (a sync, a tied
        weight's gradient): keep it for the next step, as a checkpoint would."""
        if not isinstance(self.method, StaleGradientMethod):
            raise PipelineError(
                f"rank {self.layout.rank}: module {self.layout.stage + 2} sent a gradient outside this rank's "
                "backward(); with method='bp' every process must call backward() on the output of each training forward"
            )
        self.method.keep_early_gradient(self.layout.stage, values if got.kind == Kind.GRADIENT else None)

    # ----------------------------------------------------------------------- collective points

    def sync(self, op: Op) -> None:
        """Every module of this pipeline reaches ``op`` together -- or this stops at once, saying who is
        doing what.  A stale gradient already on its way here is kept for the next step."""
        if self.closed:
            raise PipelineError(f"rank {self.layout.rank}: the pipeline is closed (the process is exiting)")
        self.finish_step(only_if_done=True)
        if self.layout.num_modules == 1:
            return
        header = self.header(Kind.SYNC, self._batch, op=op)
        for s in self.layout.peers:
            self.transport.send(s, header)
        for s, got, _ in self._listen(self.layout.peers, f"the others to reach {POINTS[op]}"):
            if got.kind != Kind.SYNC or got.op != op:
                raise self.transport.mismatch(s, got, OPS[op], mine=OPS[op])

    def _listen(self, stages: list[int], what: str) -> Iterator[tuple[int, Header, tuple[Any, ...]]]:
        """The next message from each of ``stages``, as they arrive (a stale gradient ahead of it is kept).
        Several peers are heard at once, on threads, so whoever sends something unexpected is reported
        at once even if another peer is silent."""
        early: queue.Queue[Any] = queue.Queue()

        def next_message(s: int) -> tuple[Header, tuple[Any, ...]]:
            while True:
                got, values = self.transport.recv(s, what)
                if self._ahead(s, got):
                    early.put((got, values))
                    continue
                return got, values

        def keep_all_early() -> None:
            while not early.empty():
                self._keep(*early.get())

        if len(stages) == 1:
            got, values = next_message(stages[0])
            keep_all_early()
            yield stages[0], got, values
            return
        arrived: queue.Queue[Any] = queue.Queue()

        def listen(s: int) -> None:
            try:
                arrived.put((s, *next_message(s), None))
            except BaseException as exc:  # reported by the main thread
                arrived.put((s, None, None, exc))

        threads = [threading.Thread(target=listen, args=(s,), daemon=True) for s in stages]
        for thread in threads:
            thread.start()
        seconds = self.transport.timeout.total_seconds()
        deadline = time.monotonic() + seconds + 5
        for _ in stages:
            try:
                s, got, values, exc = arrived.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise PipelineError(
                    f"rank {self.layout.rank} (module {self.layout.stage + 1}) is {what}, and some ranks of its "
                    f"pipeline did not arrive within {seconds:.0f} s (and sent nothing else): they are stuck or "
                    "much slower. Every process must reach this point."
                ) from None
            if exc is not None:
                raise exc
            keep_all_early()
            yield s, got, values
        for thread in threads:  # (each has put its message: it is ending)
            thread.join()

    def barrier(self) -> None:
        """``accelerator.wait_for_everyone()`` for the whole pipeline."""
        self.sync(Op.BARRIER)
        self.transport.barrier()

    @property
    def batch(self) -> int:
        """The batch size of the last training step."""
        return self._batch

    # ----------------------------------------------------------------------- checkpoints and exit

    def counters(self) -> dict[str, int]:
        """What a checkpoint keeps of this rank: its training and evaluation forwards."""
        return {"ticks": self.ticks, "evals": self.evals}

    def restore_counters(self, counters: dict[str, int]) -> None:
        """Resume at a checkpoint's counters, with no step pending."""
        self.ticks, self.evals = counters["ticks"], counters.get("evals", 0)
        self._pending, self._sends_down, self._early_state = None, False, None

    def close(self) -> None:
        """Leave together: every module reaches the end and every posted send has gone out."""
        if self.closed:
            return
        try:
            self.sync(Op.EXIT)
            self.transport.flush(timeout=30)
        finally:
            self.closed = True

    def mark_closed(self) -> None:
        """Closed without leaving together (the process is exiting after an error)."""
        self.closed = True
