"""The wrapper's multi-process mode: this rank runs one module and talks to the others.

A training step on the rank of module s (0-based) of K:

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
  gradients of parameters shared between modules are summed between their owners, and with
  D > 1 replicas each module's gradients are averaged and BatchNorm buffers broadcast.

What ``model(x)`` returns on a rank without the last module: zeros with exactly the
structure, shapes and dtypes of the real output (``ModelOutput`` with a scalar ``loss``,
say; found by running the model on fake tensors, once per input shape), wired so that
``loss.backward()`` runs this rank's backward.  Values computed from them are placeholders;
the real ones live on the last module's rank -- each replica's first rank, so rank 0 --
and reach every rank through ``accelerator.gather`` / ``reduce`` / ``gather_for_metrics``
or ``model.sum_over_last_modules`` (see ``replay_opt/accelerate.py``).

State dicts are collective (every rank calls them, as ``accelerator.save_state`` does): the
model's comes from replica 0's owners of each module, the optimizer's inner state likewise,
and the replay state of every rank is kept, by rank.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..cut.partition import Program, Stage, WholeCall
from ..methods.base import Method, as_leaves
from ..methods.bp import Backprop, GPipe
from ..methods.history import detached, to_device
from ..methods.join import StaleGradients, join
from ..methods.stale import StaleGradientMethod, grads_of
from .distributed import OPS, POINTS, Header, Kind, Layout, Op, PipelineError, Transport, fingerprint
from .schedules import Microbatched

FINGERPRINTED_STEPS = 2  # the first training steps (and evaluation forwards) whose batches are compared


class Pipeline:
    def __init__(
        self,
        stages: list[Stage],
        method: Method,
        layout: Layout,
        device: torch.device,
        timeout: float,
        model: torch.nn.Module,
    ):
        k = layout.num_modules
        if k > 1 and not isinstance(method, (StaleGradientMethod, Backprop)):
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
        self.model = model
        self.transport = Transport(layout, device, timeout)
        self.ticks = 0  # training forwards so far, identical on every rank
        self.evals = 0  # evaluation forwards so far
        self._pending: StaleGradients | None = None  # the last training step, until it is finished
        self._sends_down = False
        self._batch = 0
        self._reduced = False  # this optimizer step's gradients are combined (tied weights, replicas)
        self._checked_split = False
        self._tied: list[tuple[torch.nn.Parameter, list[int]]] = []  # shared parameters and their modules
        self._shapes: dict[Any, Any] = {}  # output structure per input signature (placeholders)
        self.micro: Microbatched | None = None  # method="gpipe"/"1f1b": the library's schedules
        if isinstance(method, GPipe):
            group, ranks = self.transport.pipeline_group()
            self.micro = Microbatched(
                kind=method.name, microbatches=method.microbatches, stage=self.stage.train, index=layout.stage,
                num_stages=k, device=device, group=group, stage_ranks=ranks,
            )  # fmt: skip
        self.closed = False
        _PIPELINES.add(self)
        atexit.register(_close_at_exit, weakref.ref(self))

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
        owners: dict[int, list[int]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for stage in self.stages:
            for p in stage.parameters():
                owners.setdefault(id(p), []).append(stage.index)
                params[id(p)] = p
        self._tied = [(params[i], sorted(set(s))) for i, s in owners.items() if len(set(s)) > 1]

    # ----------------------------------------------------------------------- training

    def train_forward(self, inputs: tuple[Any, ...], call: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        self.finish_step()
        self.transport.tick = self.ticks
        self.transport.prune()
        batch = _batch_size(call)
        if not isinstance(self.method, StaleGradientMethod):  # (those reset it in begin_step)
            self.method._stepped = self.method._zeroed = False
        if self.layout.num_modules == 1:  # data parallel only: the method as in one process
            out = self.method.forward(inputs)
            stale = StaleGradients([], [], on_backward=_noop)
            self._pending, self.ticks = stale, self.ticks + 1
            return join(out, stale)
        if self.micro is not None:
            return self._train_forward_microbatched(inputs, call, batch)
        if isinstance(self.method, Backprop):
            return self._train_forward_exact(inputs, call, batch)
        m, s, k = self.method, self.layout.stage, self.layout.num_modules
        assert isinstance(m, StaleGradientMethod)
        restored = m._restored
        _, discarded = m.begin_step()
        header = self._header(Kind.ACTIVATIONS, batch, call, self.ticks < FINGERPRINTED_STEPS)
        x = self._receive_input(Kind.ACTIVATIONS, inputs, header, "the activations of a training step")
        self._sends_down = s > 0 and self.ticks >= k - s - 1  # module s-1 expects a message after this step
        self._batch = batch
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        if s < k - 1:

            def send_up_then_receive(played: tuple[Any, ...], due: bool) -> Any:
                # Post the activations first, so module s+1 can start while this rank waits.
                self.transport.send(s + 1, header, played)
                grads_in = restored[s] if restored is not None else None
                if restored is None and due:
                    got, values = self._recv(s + 1, (Kind.GRADIENT, Kind.DROPPED), "the stale gradient")
                    grads_in = values if got.kind == Kind.GRADIENT else None
                return None if discarded else grads_in

            m.step_module(s, x, send_up_then_receive, outputs, grads)
            out = self._placeholder(call, requires_grad=True)
        else:
            out = m.run_last(x)
        m.account()
        stale = StaleGradients(outputs, grads, on_backward=_noop)
        self._pending, self.ticks = stale, self.ticks + 1
        return join(out, stale)

    def _train_forward_exact(self, inputs: tuple[Any, ...], call: Any, batch: int) -> Any:
        """``method="bp"``: naive model parallelism.  The forward goes up through every module in turn;
        inside ``loss.backward()`` this rank waits (bounded) for the gradient of this step's output from
        module s+1, back-propagates it, and sends the gradient of its input down at once."""
        s, k = self.layout.stage, self.layout.num_modules
        header = self._header(Kind.ACTIVATIONS, batch, call, self.ticks < FINGERPRINTED_STEPS)
        x = self._receive_input(Kind.ACTIVATIONS, inputs, header, "the activations of a training step")
        x = as_leaves(x) if s > 0 else x
        self._batch = batch
        out = self.method.run_stage(self.stage, x)

        def send_down() -> None:  # the end of this rank's backward: module s-1 is waiting for it
            if s > 0:
                self.transport.send(s - 1, self._header(Kind.GRADIENT, batch), grads_of(x))

        if s == k - 1:
            exact = StaleGradients([], [], on_backward=send_down)
        else:
            self.transport.send(s + 1, header, out)
            wired = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.requires_grad]

            def output_gradient() -> list[torch.Tensor | None]:
                _, values = self._recv(s + 1, Kind.GRADIENT, "the gradient of this step's output (method='bp')")
                return [values[i] for i in wired]

            exact = StaleGradients([out[i] for i in wired], output_gradient, on_backward=send_down)
            out = self._placeholder(call, requires_grad=True)
        self._pending, self.ticks = exact, self.ticks + 1
        return join(out, exact)

    def _train_forward_microbatched(self, inputs: tuple[Any, ...], call: Any, batch: int) -> Any:
        """``method="gpipe"``/``"1f1b"``: the schedule's forward-only pass now, its training pass when the step
        is finished (``replay_opt/schedules.py``).  A header first, so ranks at different steps or on different
        batches stop with the same errors as the other methods."""
        s, k = self.layout.stage, self.layout.num_modules
        header = self._header(Kind.ACTIVATIONS, batch, call, self.ticks < FINGERPRINTED_STEPS)
        if s > 0:
            got, _ = self._recv(s - 1, Kind.ACTIVATIONS, "the start of a training step")
            self._check_same_step(s - 1, got, header)
        if s < k - 1:
            self.transport.send(s + 1, header)
        self._batch = batch
        assert self.micro is not None
        with self._schedule_errors("forward pass"):
            program = self.stage.program
            inputs = to_device(inputs, self.device) if s == 0 else inputs
            out = self.micro.forward((id(program), _call_key(call)), program, inputs, batch)
        if s < k - 1:
            out = self._placeholder(call, requires_grad=True)
        step = StaleGradients([], [], on_backward=_noop)  # only to see that backward() reached the output
        self._pending, self.ticks = step, self.ticks + 1
        return join(out, step)

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
            with self.transport._guard(f"in the {self.method.name} schedule's {what}"):
                raise

    def finish_step(self, only_if_done: bool = False) -> None:
        """Send the last training step's gradient down (or "discarded"); once, at step() or the next forward.
        ``only_if_done``: at a collective point, which may come between a forward and its backward (gathering
        the loss to decide whether to skip the step), leave a step without backward pending."""
        stale = self._pending
        if stale is None:
            return
        m, s = self.method, self.layout.stage
        discarded = m._discarded_last_step()
        if only_if_done and not stale.delivered and not discarded:
            return
        self._pending = None
        if not stale.delivered and not discarded:
            raise RuntimeError(
                f"rank {self.layout.rank} (module {s + 1}): the training step {self.ticks - 1} had no backward(). "
                "Every training-mode forward must be followed by backward(); to skip a step (a NaN loss, say), call "
                "optimizer.zero_grad() before the next forward, on every process -- decide together, from the real "
                "loss of the last module: `if accelerator.gather(loss).isnan().any(): optimizer.zero_grad(); "
                "continue`. For forwards that should not train use model.eval() or torch.no_grad()."
            )
        if self.micro is not None:
            with self._schedule_errors("training pass"):
                self.micro.finish(discarded)
        if not self._sends_down:
            return
        header = self._header(Kind.DROPPED if discarded else Kind.GRADIENT, self._batch)
        if discarded:
            self.transport.send(s - 1, header)
        else:
            leaves = m._leaves[s] if isinstance(m, StaleGradientMethod) else None
            self.transport.send(s - 1, header, () if leaves is None else grads_of(leaves))
        self._sends_down = False

    def reduce_gradients(self) -> set[int]:
        """Combine this optimizer step's gradients, once: tied weights summed over the modules that share
        them, then each module averaged over replicas.  Returns the ids of the tied parameters to update."""
        self.finish_step()
        if self._reduced:
            return self._tied_live
        live: set[int] = set()
        s = self.layout.stage
        updated = bool(self.method.updated_stages()[s]) if self.layout.num_modules > 1 else True
        header = self._header(Kind.TIED, self._batch)
        for p, owners in self._tied:
            if s not in owners:
                continue
            mine = p.grad if p.grad is not None else torch.zeros_like(p)
            for o in owners:
                if o != s:
                    self.transport.send(o, header, (mine, torch.tensor(float(updated))))
            parts, any_live = {s: mine}, updated
            for o in owners:
                if o != s:
                    _, (grad, flag) = self._recv(o, Kind.TIED, "a tied parameter's gradient")
                    parts[o] = grad
                    any_live = any_live or bool(flag)
            total = parts[owners[0]].clone()
            for o in owners[1:]:
                total += parts[o].to(total.device)
            p.grad = total
            if any_live:
                live.add(id(p))
        self.transport.average_gradients(self.stage.parameters())
        self.transport.broadcast_buffers(list(self.stage.train.buffers()))
        self._reduced, self._tied_live = True, live
        return live

    def on_step(self) -> None:
        self._reduced = False

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: every module's gradients, each shared
        parameter once, after the replicas' average."""
        self.reduce_gradients()
        wanted = {id(p) for p in parameters}
        s = self.layout.stage
        first_owner = {id(p): owners[0] for p, owners in self._tied}
        grads = [
            p.grad
            for p in self.stage.parameters()
            if p.grad is not None and id(p) in wanted and first_owner.get(id(p), s) == s
        ]
        norm_type = float(norm_type)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)  # one device-to-host copy, below
        what = "computing the global gradient norm"
        if norm_type == float("inf"):
            local = max((g.detach().abs().max().double() for g in grads), default=zero)
            total = self.transport.all_reduce(local, what, op=torch.distributed.ReduceOp.MAX)
        else:
            local = sum((g.detach().double().abs().pow(norm_type).sum() for g in grads), zero)
            total = (self.transport.all_reduce(local, what) / self.layout.replicas).pow(1.0 / norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.stage.parameters():
            if p.grad is not None and id(p) in wanted:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return total.to(torch.float32)

    # ----------------------------------------------------------------------- inference

    def infer(self, inputs: tuple[Any, ...], call: tuple[tuple[Any, ...], dict[str, Any]], training: bool) -> Any:
        self.finish_step()
        s, k = self.layout.stage, self.layout.num_modules
        if k == 1:
            return self.stage.forward(training, *inputs)
        batch = _batch_size(call)
        header = self._header(Kind.EVAL, batch, call, self.evals < FINGERPRINTED_STEPS)
        x = self._receive_input(Kind.EVAL, inputs, header, "the activations of an evaluation forward")
        self.evals += 1
        out = self.stage.forward(training, *x)
        if s < k - 1:
            self.transport.send(s + 1, header, out)
            return self._placeholder(call, requires_grad=False)
        return out

    # ----------------------------------------------------------------------- collective points

    def sync(self, op: Op) -> None:
        """Every module of this pipeline reaches ``op`` together -- or this stops at once, saying who is
        doing what.  A stale gradient already on its way here is kept for the next step."""
        if self.closed:
            raise PipelineError(f"rank {self.layout.rank}: the pipeline is closed (the process is exiting)")
        self.finish_step(only_if_done=True)
        if self.layout.num_modules == 1:
            return
        header = self._header(Kind.SYNC, self._batch, op=op)
        for s in self.layout.peers:
            self.transport.send(s, header)
        for s, got, _ in self._listen(self.layout.peers, f"the others to reach {POINTS[op]}"):
            if got.kind != Kind.SYNC or got.op != op:
                raise self.transport.mismatch(s, got, OPS[op], mine=OPS[op])

    def _listen(self, stages: list[int], what: str) -> Iterator[tuple[int, Header, tuple[Any, ...]]]:
        """The next message from each of ``stages``, as they arrive (a stale gradient ahead of it is kept).
        Several peers are heard at once, on threads, so whoever sends something unexpected is reported
        at once even if another peer is silent."""
        below = self.layout.stage + 1

        def next_message(s: int) -> tuple[Header, tuple[Any, ...]]:
            while True:
                got, values = self.transport.recv(s, what)
                if got.kind in (Kind.GRADIENT, Kind.DROPPED) and s == below:
                    early.put((got, values))
                    continue
                return got, values

        early: queue.Queue[Any] = queue.Queue()
        if len(stages) == 1:
            got, values = next_message(stages[0])
            self._keep_all_early(early)
            yield stages[0], got, values
            return
        arrived: queue.Queue[Any] = queue.Queue()

        def listen(s: int) -> None:
            try:
                arrived.put((s, *next_message(s), None))
            except BaseException as exc:  # reported by the main thread
                arrived.put((s, None, None, exc))

        for s in stages:
            threading.Thread(target=listen, args=(s,), daemon=True).start()
        deadline = time.monotonic() + self.transport.timeout.total_seconds() + 5
        for _ in stages:
            try:
                s, got, values, exc = arrived.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise PipelineError(
                    f"rank {self.layout.rank} (module {self.layout.stage + 1}) is {what}, and some ranks of its "
                    f"pipeline did not arrive within {self.transport.timeout.total_seconds():.0f} s (and sent nothing "
                    "else): they are stuck or much slower. Every process must reach this point."
                ) from None
            if exc is not None:
                raise exc
            self._keep_all_early(early)
            yield s, got, values

    def _keep_all_early(self, early: queue.Queue[Any]) -> None:
        while not early.empty():
            self._keep_early(*early.get())

    def barrier(self) -> None:
        self.sync(Op.BARRIER)
        self.transport.barrier()

    def sum_over_last_modules(self, value: torch.Tensor) -> torch.Tensor:
        self.sync(Op.METRIC)
        last = self.layout.stage == self.layout.num_modules - 1
        out = value.detach().to(torch.float64) if last else torch.zeros(value.shape, dtype=torch.float64)
        total = self.transport.all_reduce(out, "summing a metric over the last modules")
        return total.to(value.dtype if value.is_floating_point() else torch.float64).to(value.device)

    def gather_from_last_modules(self, data: Any) -> Any:
        """What ``accelerator.gather`` returns in D data-parallel processes: the last modules' values, concatenated
        over replicas, on every rank."""
        self.sync(Op.METRIC)
        last = self.layout.stage == self.layout.num_modules - 1
        mine = tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, data) if last else None
        parts = [p for p in self.transport.gather_objects(mine) if p is not None]
        leaves = [tree_flatten(p) for p in parts]
        spec = leaves[0][1]
        out = []
        for i in range(len(leaves[0][0])):
            values = [lv[0][i] for lv in leaves]
            if isinstance(values[0], torch.Tensor):
                values = [v.reshape(1) if v.dim() == 0 else v for v in values]
                out.append(torch.cat(values).to(self.device))
            else:
                out.append(values)
        return tree_unflatten(out, spec)

    def gather_objects_from_last_modules(self, obj: Any) -> list[Any]:
        """Each replica's last module's ``obj`` (picklable), in replica order, on every rank."""
        self.sync(Op.METRIC)
        last = self.layout.stage == self.layout.num_modules - 1
        parts = self.transport.gather_objects((last, obj if last else None))
        return [o for is_last, o in parts if is_last]

    def close(self) -> None:
        """Leave together: every module reaches the end, sends complete, the process group is released."""
        if self.closed:
            return
        try:
            self.sync(Op.EXIT)
            self.transport.flush(timeout=30)
        finally:
            self.closed = True

    # ----------------------------------------------------------------------- checkpoints

    def model_state_dict(self, full: dict[str, torch.Tensor], local_keys: set[str]) -> dict[str, torch.Tensor]:
        self.sync(Op.STATE)
        own = {k: v.detach().cpu() for k, v in full.items() if k in local_keys} if self.layout.replica == 0 else {}
        merged = dict(full)
        for part in self.transport.gather_objects(own):
            for key, value in part.items():
                merged[key] = value.to(full[key].device) if isinstance(full[key], torch.Tensor) else value
        return merged

    def optimizer_state_dict(self, inner: dict[str, Any], local: set[int], replay: Callable[[], Any]) -> dict[str, Any]:
        """Collect every rank's part (``replay`` is called after the sync, with any in-flight gradient kept)."""
        self.sync(Op.STATE)
        own = {i: _to_cpu(st) for i, st in inner["state"].items() if i in local} if self.layout.replica == 0 else {}
        mine = {"rank_state": _to_cpu(replay()), "ticks": self.ticks, "evals": self.evals}
        parts = self.transport.gather_objects((own, mine))
        state: dict[int, Any] = {}
        for own_part, _ in parts:
            state.update(own_part)
        return {
            "state": state,
            "param_groups": inner["param_groups"],
            "replay": {
                "world_size": self.layout.world_size,
                "num_modules": self.layout.num_modules,
                "ranks": [p[1] for p in parts],
            },
        }

    def load_replay(self, replay: dict[str, Any]) -> dict[str, Any]:
        """This rank's replay state from a pipeline checkpoint (same layout required)."""
        if replay.get("world_size") != self.layout.world_size or replay.get("num_modules") != self.layout.num_modules:
            raise ValueError(
                f"checkpoint was written by {replay.get('world_size')} ranks with num_modules="
                f"{replay.get('num_modules')}; resume with the same number of processes and modules "
                f"(now {self.layout.world_size} and {self.layout.num_modules})"
            )
        mine = replay["ranks"][self.layout.rank]
        self.ticks, self.evals = mine["ticks"], mine.get("evals", 0)
        self._pending, self._sends_down = None, False
        return mine["rank_state"]

    # ----------------------------------------------------------------------- messages

    def _header(self, kind: Kind, batch: int, call: Any = None, fingerprinted: bool = False, op: int = 0) -> Header:
        fp = fingerprint(tree_flatten(call)[0]) if fingerprinted and call is not None else 0.0
        return Header(kind, op, self.ticks, self.evals, self.method.steps, batch, fp)

    def _receive_input(self, kind: Kind, inputs: tuple[Any, ...], header: Header, what: str) -> tuple[Any, ...]:
        s = self.layout.stage
        if s == 0:
            return to_device(detached(inputs), self.device)
        got, values = self._recv(s - 1, kind, what)
        self._check_same_step(s - 1, got, header)
        return values

    def _keep_early(self, got: Header, values: tuple[Any, ...]) -> None:
        """A stale gradient that arrived ahead of another message on the same channel (a sync, a tied
        weight's gradient): keep it for the next step, as a checkpoint would."""
        m, s, k = self.method, self.layout.stage, self.layout.num_modules
        if not isinstance(m, StaleGradientMethod):
            raise PipelineError(
                f"rank {self.layout.rank}: module {s + 2} sent a gradient outside this rank's backward(); with "
                "method='bp' every process must call backward() on the output of each training forward"
            )
        if m._restored is not None:
            raise PipelineError(f"rank {self.layout.rank}: two stale gradients arrived for one step")
        restored: list[Any] = [None] * (k - 1)
        restored[s] = values if got.kind == Kind.GRADIENT else None
        m._restored = restored
        m._stepped, m._zeroed = True, False

    def _recv(self, from_stage: int, expect: Kind | tuple[Kind, ...], what: str) -> tuple[Header, tuple[Any, ...]]:
        expected = expect if isinstance(expect, tuple) else (expect,)
        while True:
            got, values = self.transport.recv(from_stage, what)
            if got.kind in expected:
                return got, values
            if got.kind in (Kind.GRADIENT, Kind.DROPPED) and from_stage == self.layout.stage + 1:
                self._keep_early(got, values)  # ahead of a tied-weights message on the same channel
                continue
            raise self.transport.mismatch(from_stage, got, what)

    def _check_same_step(self, from_stage: int, got: Header, mine: Header) -> None:
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
        if got.batch != mine.batch:
            raise PipelineError(
                f"{me} got a batch of {mine.batch} while rank {peer} (module {from_stage + 1}) got one of {got.batch}: "
                "the ranks of a pipeline must iterate the same batches -- prepare the data loader with "
                "accelerator.prepare(loader) *after* wrapping the model (it is then sharded over replicas, not "
                "processes), or with model.prepare_data_loader(loader)"
            )
        if got.fingerprint and mine.fingerprint and got.fingerprint != mine.fingerprint:
            raise PipelineError(
                f"{me} and rank {peer} (module {from_stage + 1}) got different batches: the ranks of a pipeline must "
                "iterate the same batches -- prepare the data loader with accelerator.prepare(loader) *after* "
                "wrapping the model (it is then sharded over replicas, not processes), or with "
                "model.prepare_data_loader(loader)"
            )

    # ----------------------------------------------------------------------- placeholders

    def _placeholder(self, call: tuple[tuple[Any, ...], dict[str, Any]], requires_grad: bool) -> Any:
        """Zeros shaped exactly like the model's output for this call (it runs elsewhere)."""
        key = (self.model.training, _call_key(call))
        if key not in self._shapes:
            self._shapes[key] = _output_structure(self.model, call)
        metas, out_spec = self._shapes[key]
        values = [
            torch.zeros(m[0], dtype=m[1], device=self.device).requires_grad_(
                requires_grad and (m[1].is_floating_point or m[1].is_complex)
            )
            if isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], torch.dtype)
            else m
            for m in metas
        ]
        return tree_unflatten(values, out_spec)


def _lost_peer(exc: BaseException) -> bool:
    """Whether an error of torch.distributed.pipelining comes from the communication (a peer that failed or
    timed out) rather than from the model."""
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        w in text for w in ("timed out", "timeout", "connection", "gloo", "nccl", "peer")
    )


def _call_key(call: Any) -> tuple[Any, ...]:
    """The structure, shapes and dtypes of a call: what decides the output's shapes."""
    leaves, spec = tree_flatten(call)
    return str(spec), tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)


def _output_structure(model: torch.nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[list[Any], Any]:
    """The model's output on this call -- structure, shapes, dtypes -- from a forward on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    args, kwargs = call
    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=False), torch.no_grad():
        state = {n: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for n, t in _tensors(model)}
        fake_args, fake_kwargs = tree_map(
            lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v,
            (args, kwargs),
        )
        out = functional_call(model, state, fake_args, fake_kwargs, tie_weights=False, strict=False)
    leaves, spec = tree_flatten(out)
    return [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in leaves], spec


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _batch_size(call: tuple[tuple[Any, ...], dict[str, Any]]) -> int:
    leaves = tree_flatten(call)[0]
    if len(leaves) == 1 and isinstance(leaves[0], WholeCall):
        leaves = tree_flatten((leaves[0].args, leaves[0].kwargs))[0]
    return next((v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0), 0)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _noop() -> None:
    pass


# --------------------------------------------------------------------------- the process's pipelines

_PIPELINES: weakref.WeakSet[Pipeline] = weakref.WeakSet()


def active_pipeline() -> Pipeline | None:
    """The pipeline this process runs a module of (None in one process)."""
    live = [p for p in _PIPELINES if not p.closed]
    return live[-1] if live else None


def _close_at_exit(ref: weakref.ref[Pipeline]) -> None:
    """At interpreter exit: leave together with the other modules, then release the process group
    (a process group torn down during interpreter shutdown can abort the process)."""
    pipeline = ref()
    if pipeline is None or pipeline.closed:
        return
    import torch.distributed as dist

    try:
        if getattr(sys, "last_value", None) is None and dist.is_initialized():
            pipeline.close()
    except PipelineError as exc:
        print(f"replay_opt: {exc}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        import os

        os._exit(1)
    finally:
        pipeline.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()


class FreshStateDict:
    """State-dict hook of the wrapped model with one process per module: the entries of every module come
    from the rank that trains it (collective: every rank must ask together)."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = weakref.ref(wrapper)

    def __call__(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        wrapper = self.wrapper()
        if wrapper is None or wrapper._pipeline is None or wrapper._pipeline.closed:
            return
        stage = wrapper._local_stage
        own = {id(t) for t in [*stage.parameters(), *stage.train.buffers()]}
        named = _tensors(module)
        local_keys = {prefix + name for name, t in named if id(t) in own}
        state_dict.update(wrapper._pipeline.model_state_dict(state_dict, local_keys))
        # Tied weights stay one tensor under all their names, as in one process (save_pretrained and
        # safetensors then store them once); every owner holds the same value.
        first: dict[int, str] = {}
        for name, t in named:
            key = first.setdefault(id(t), prefix + name)
            if prefix + name in state_dict and key in state_dict:
                state_dict[prefix + name] = state_dict[key]
