"""Exact micro-batched pipelining (``method="gpipe"`` / ``"1f1b"``) on torch.distributed.pipelining.

The library's schedules (``ScheduleGPipe``, ``Schedule1F1B``) run a whole training step --
every micro-batch's forward and backward, interleaved as the schedule says -- in one call,
with the loss computed inside it.  A standard loop computes the loss *after* ``model(x)``
returns.  So one training step runs in two phases, both through the library:

1. ``model(x)``: the schedule's forward-only pass (``schedule.eval`` without autograd),
   micro-batch after micro-batch through every module.  The last module's rank returns the
   real output -- the micro-batches' outputs concatenated along dim 0, scalar outputs (a
   loss computed inside the model) averaged over micro-batches -- as autograd leaves.
2. ``optimizer.step()`` (or the next forward, ``clip_grad_norm_``, a state dict): the user's
   ``backward()`` has left dL/d(output) on those leaves, and the schedule's training pass
   runs with the loss ``sum(out_i * g_i)`` on micro-batch i, where g_i is that gradient's
   slice.  Each parameter gets sum_i g_i * d(out_i)/d(theta) = dL/d(theta): exactly plain
   backprop's gradient, for any loss (no 1/M scaling: ``scale_grads=False``).

Phase 2 replays phase 1's random state (dropout draws the same masks) and leaves BatchNorm's
running statistics alone, as Features Replay's replays do (phase 1 already updated them, once
per micro-batch).  BatchNorm normalizes each micro-batch with its own statistics, as in
GPipe -- the model computes what it computes when its micro-batches are fed one after the
other.  The price of a standard loop is one more forward per step (forward-only, no graph
kept); the schedule's memory profile is the library's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..methods.base import as_leaves
from ..methods.batchnorm import frozen_running_stats
from ..methods.history import RngState
from .placeholders import named_tensors

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
_CACHED = 4  # schedules kept per input shape (a smaller last batch, another sequence length)


def microbatches_for(batch: int, m: int, at_least: int = 1) -> int:
    """How many micro-batches to cut ``batch`` into.  The library sends equal micro-batches, so a batch that
    ``m`` does not divide (a smaller last batch) is cut into the most micro-batches <= ``m`` that divide it,
    and at least ``at_least`` (1F1B needs K) -- or, when none does, into the fewest >= ``at_least``."""
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    fits = [d for d in divisors if at_least <= d <= m]
    if fits:
        return fits[-1]
    above = [d for d in divisors if d >= at_least]
    if not above:
        raise ValueError(
            f"a batch of {batch} cannot be cut into {at_least} or more micro-batches (method='1f1b' with "
            f"{at_least} modules): use batches of at least {at_least} (drop_last=True in the data loader) or "
            "method='gpipe'"
        )
    return above[0]


class _Flat(nn.Module):
    """A stage as the library wants it: tensors in, a tuple of tensors out.  On the last stage the
    output's structure and non-tensor leaves are kept aside and scalars travel as shape (1,)."""

    def __init__(self, stage: nn.Module, index: int, last: bool, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stage = stage
        self.index = index
        self.last = last
        self.spec: Any = None
        self.leaves: list[Any] = []  # the last stage's output leaves that are not tensors
        self.scalars: list[bool] = []

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        module = self.stage.current_module()
        numbers = getattr(module, "number_inputs", ())
        inputs = tuple(v.item() if i in numbers else v for i, v in enumerate(inputs))
        return self.to_wire(self.stage(*inputs), module, remember=True)

    def to_wire(self, out: Any, module: nn.Module, remember: bool = False) -> tuple[torch.Tensor, ...]:
        """The stage's output as the tuple of tensors the library sends or, on the last stage, merges (scalars
        as shape (1,)); ``remember``: keep what rebuilds the last stage's output."""
        if not self.last:
            return _sent(out, module, self.index, self.device)
        leaves, spec = tree_flatten(out)
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        if remember:
            self.spec, self.leaves = spec, [None if isinstance(v, torch.Tensor) else v for v in leaves]
            self.scalars = [t.dim() == 0 for t in tensors]
        return tuple(t.reshape(1) if t.dim() == 0 else t for t in tensors)

    def metadata(self, program: Any, inputs: tuple[Any, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
        """This stage's inputs and outputs for micro-batch ``inputs`` of module 1, as meta tensors: modules 1..s
        run on fake tensors (every rank has the whole model).  Given to the library, they spare it inferring
        shapes by running the stages on empty tensors -- which cannot carry the numbers (sizes) some cuts pass."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.func import functional_call

        def fake(t: torch.Tensor) -> torch.Tensor:  # on the CPU, wherever the module lives: no data moves
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).requires_grad_(t.requires_grad)

        def run(module: nn.Module, x: tuple[Any, ...]) -> Any:
            state = {n: fake(t) for n, t in named_tensors(module)}
            return functional_call(module, state, x, strict=False, tie_weights=False)

        with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True):
            x = tuple(fake(v) if isinstance(v, torch.Tensor) else v for v in inputs)
            received = tuple(v for v in x if isinstance(v, torch.Tensor))
            for j in range(self.index):
                out = run(program.stages[j], x)
                received = _sent(out, program.stages[j], j, self.device)
                x = as_leaves(tuple(out))
            module = program.stages[self.index]
            return _as_meta(received), _as_meta(self.to_wire(run(module, x), module))


def _sent(out: tuple[Any, ...], module: nn.Module, index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """What module ``index`` (not the last) sends: its outputs, numbers as 0-dim tensors, all contiguous."""
    numbers = getattr(module, "number_outputs", ())
    leaves = [torch.tensor(v, device=device) if i in numbers else v for i, v in enumerate(tree_flatten(out)[0])]
    if any(not isinstance(v, torch.Tensor) for v in leaves):
        kinds = sorted({type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)})
        raise TypeError(
            f"module {index + 1} passes {', '.join(kinds)} to module {index + 2}; method='gpipe'/'1f1b' sends "
            "tensors only between modules (torch.distributed.pipelining): choose other split_points, "
            "capture='export', or method='bp' or 'fr'"
        )
    return tuple(v.contiguous() for v in leaves)  # (what the library sends must be)


def _as_meta(values: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(v.shape, dtype=v.dtype, device="meta").requires_grad_(v.requires_grad) for v in values)


class Microbatched:
    """This rank's stage under one of the library's schedules, a training step in two phases."""

    def __init__(
        self,
        *,
        kind: str,
        microbatches: int,
        stage: nn.Module,
        index: int,
        num_stages: int,
        device: torch.device,
        group: dist.ProcessGroup,
        stage_ranks: dict[int, int],
    ) -> None:
        self.kind = kind
        self.microbatches = microbatches
        self.index, self.num_stages = index, num_stages
        self.first, self.last = index == 0, index == num_stages - 1
        self.flat = _Flat(stage, index, self.last, device)
        self.device = device
        self.group = group
        self.stage_ranks = stage_ranks  # stage index -> rank in ``group``
        self._schedules: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._grads: list[list[torch.Tensor | None]] = []  # per micro-batch, dL/d(output leaf), in phase 2
        self._step: tuple[Any, int, list[tuple[Any, ...]] | None, list[torch.Tensor], Any] | None = None

    def _schedules_for(self, key: Hashable, m: int, program: Any, first: tuple[Any, ...]) -> tuple[Any, Any]:
        """(forward-only, training) schedules for this input shape (``first``: module 1's first micro-batch).
        Two objects, because the library sets a schedule up anew whenever it switches between the two."""
        key = (key, m)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        from torch.distributed import pipelining

        metas = self.flat.metadata(program, first)
        made = []
        for loss_fn in (None, self._inject):
            stage = pipelining.PipelineStage(
                self.flat, self.index, self.num_stages, self.device, input_args=metas[0], output_args=metas[1],
                group=self.group,
            )  # fmt: skip
            stage.stage_index_to_group_rank = dict(self.stage_ranks)
            cls = getattr(pipelining, SCHEDULES[self.kind])
            made.append((cls(stage, m, loss_fn=loss_fn, scale_grads=False), stage))
        self._schedules[key] = (made[0], made[1])
        while len(self._schedules) > _CACHED:
            self._schedules.popitem(last=False)
        return made[0], made[1]

    def _inject(self, output: tuple[torch.Tensor, ...], index: torch.Tensor) -> torch.Tensor:
        """The loss of micro-batch ``index`` (the target the library splits must be a tensor: the index),
        whose gradient w.r.t. ``output`` is the user's: sum(out * g)."""
        grads = self._grads[int(index)]
        terms = [(o * g.to(o.dtype)).sum() for o, g in zip(output, grads) if g is not None]
        return torch.stack(terms).sum() if terms else output[0].sum() * 0

    @staticmethod
    def split(inputs: tuple[Any, ...], batch: int, m: int) -> list[tuple[Any, ...]]:
        """Module 1's inputs cut into ``m`` micro-batches along dim 0 (tensors of another length are repeated)."""
        cut = [
            torch.tensor_split(v, m) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else [v] * m
            for v in inputs
        ]
        return [tuple(c[i] for c in cut) for i in range(m)]

    def forward(self, key: Hashable, program: Any, inputs: tuple[Any, ...], batch: int) -> Any:
        """Phase 1: the schedule's forward-only pass (``inputs``: module 1's, on every rank).  On the last
        stage, the output (leaves require grad)."""
        m = microbatches_for(batch, self.microbatches, self.num_stages if self.kind == "1f1b" else 1)
        arg_mbs = self.split(inputs, batch, m)
        forward_only, training = self._schedules_for(key, m, program, arg_mbs[0])
        arg_mbs = arg_mbs if self.first else None
        rng = RngState.capture(self.device)
        with torch.no_grad():
            merged = forward_only[0].eval(arg_mbs=arg_mbs)
        forward_only[1].clear_runtime_states()  # the micro-batches' outputs: merged is a copy
        leaves: list[torch.Tensor] = []
        out = None
        if self.last:
            tensors = list(merged) if isinstance(merged, (tuple, list)) else [merged]
            leaves = list(as_leaves(tuple(t.mean() if scalar else t for t, scalar in zip(tensors, self.flat.scalars))))
            it = iter(leaves)
            out = tree_unflatten([next(it) if v is None else v for v in self.flat.leaves], self.flat.spec)
        self._step = (training, m, arg_mbs, leaves, rng)
        return out

    def finish(self, discarded: bool) -> None:
        """Phase 2 (unless the step was discarded): the schedule's training pass, with phase 1's random state."""
        if self._step is None:
            return
        training, m, arg_mbs, leaves, rng = self._step
        self._step = None
        if discarded:
            return
        target_mbs = None
        if self.last:  # this micro-batch's slice of dL/d(output); a scalar output was the micro-batches' mean
            grads = [
                [None] * m if t.grad is None else [t.grad / m] * m if scalar else list(torch.tensor_split(t.grad, m))
                for t, scalar in zip(leaves, self.flat.scalars)
            ]
            self._grads = [[g[i] for g in grads] for i in range(m)]
            target_mbs = [torch.tensor(i) for i in range(m)]
        # The forward the user's loss saw, once more: its random draws, and BatchNorm's running statistics
        # (moved in phase 1) left alone, as in Features Replay's replays.
        with rng.restored(), frozen_running_stats(self.flat), torch.enable_grad():
            training[0].step(arg_mbs=arg_mbs, target_mbs=target_mbs, return_outputs=False)
        training[1].clear_runtime_states()
        self._grads = []
