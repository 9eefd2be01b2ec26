"""The wrapper's multi-process mode: this rank runs one module and talks to its neighbours.

Per training step on the rank of module s (0-based) of K:

* s > 0 receives this step's activations from module s-1; module 0 takes the batch;
* s < K-1 advances its module (FR: play, replay; DDG: forward, oldest graph),
  posts the activations to module s+1, then receives the gradient module s+1
  sent down in the previous step and pairs it with its due output;
* module K-1 runs the batch with a graph and returns the real output;
* when the user's ``backward()`` finishes (an autograd end-of-backward callback),
  the gradient w.r.t. the inputs this module back-propagated goes down to module
  s-1 for its next step, and, with D > 1 replicas, gradients are averaged and
  BatchNorm buffers broadcast within the module's data-parallel group.

What ``model(x)`` returns on a rank without the last module: zeros shaped like the
real output (the batch size from ``x``), wired so that ``loss.backward()`` runs
this rank's backward.  The loss computed from it is meaningless; metrics come from
the last module through ``model.sum_over_last_modules(value)``.  Only module 0
uses ``x`` and only the last rank's targets matter, but every rank must iterate
the same batches: build loaders with ``model.prepare_data_loader(loader)``.

State dicts are collective (every rank calls them, as ``accelerator.save_state``
does): the model's comes from replica 0's owners of each module, the optimizer's
inner state likewise, and the replay state of every rank is kept, by rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .distributed import TAG_ACTIVATION, TAG_EVAL, TAG_GRADIENT, Layout, Transport
from .history import detached, to_device
from .join import StaleGradients, join
from .methods.base import Method
from .methods.stale import StaleGradientMethod, grads_of
from .partition import Stage


class Pipeline:
    def __init__(self, stages: list[Stage], method: Method, layout: Layout, device: torch.device, timeout: float):
        k = layout.num_modules
        if k > 1 and not isinstance(method, StaleGradientMethod):
            raise ValueError(
                f"method={method.name!r} runs in one process; with one process per module use method='fr' or "
                "'ddg' (any method works with num_modules=1 and data-parallel replicas)"
            )
        self.layout = layout
        self.method = method
        self.stage = stages[layout.stage]
        self.stage.device = device
        self.device = device
        self.transport = Transport(layout, device, timeout)
        self.ticks = 0  # training forwards so far, identical on every rank
        self._output_spec: Any = None
        self._sends_down = False
        self._batch = 0

    # ----------------------------------------------------------------------- training

    def train_forward(self, inputs: tuple[Any, ...]) -> Any:
        batch = _batch_size(inputs)
        self.transport.prune()
        if self.layout.num_modules == 1:  # data parallel only: the method as in one process
            out = self.method.forward(inputs)
            return join(out, StaleGradients([], [], on_backward=self._after_backward))
        m, s, k = self.method, self.layout.stage, self.layout.num_modules
        restored = m._restored
        _, discarded = m.begin_step()
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        x = self._receive_input(inputs, TAG_ACTIVATION, batch)
        self._sends_down = s > 0 and self.ticks >= k - s - 1  # module s-1 expects a message after backward
        self._batch = batch
        if s < k - 1:

            def send_up_then_receive(played: tuple[Any, ...], due: bool) -> Any:
                # Post the activations first, so module s+1 can start while this rank waits.
                self.transport.send(played, s + 1, TAG_ACTIVATION, batch)
                grads_in = restored[s] if restored is not None else None
                if restored is None and due:
                    grads_in = self.transport.recv(s + 1, TAG_GRADIENT, "the stale gradient") or None
                return None if discarded else grads_in

            m.step_module(s, x, send_up_then_receive, outputs, grads)
            out = self._proxy(batch, requires_grad=True)
        else:
            out = m.run_last(x)
            self._learn_output_spec(out)
        m.account()
        self.ticks += 1
        return join(out, StaleGradients(outputs, grads, on_backward=self._after_backward))

    def _after_backward(self) -> None:
        s = self.layout.stage
        if self._sends_down:
            leaves = self.method._leaves[s]
            grads = () if leaves is None else grads_of(leaves)
            self.transport.send(grads, s - 1, TAG_GRADIENT, self._batch)
            self._sends_down = False
        params = self.stage.parameters()
        self.transport.average_gradients(params)
        self.transport.broadcast_buffers(list(self.stage.train.buffers()))

    # ----------------------------------------------------------------------- inference

    def infer(self, inputs: tuple[Any, ...], training: bool) -> Any:
        batch = _batch_size(inputs)
        s, k = self.layout.stage, self.layout.num_modules
        x = self._receive_input(inputs, TAG_EVAL, batch)
        out = self.stage.forward(training, *x)
        if s < k - 1:
            self.transport.send(out, s + 1, TAG_EVAL, batch)
            return self._proxy(batch, requires_grad=False)
        self._learn_output_spec(out)
        return out

    # ----------------------------------------------------------------------- helpers

    def _receive_input(self, inputs: tuple[Any, ...], tag: int, batch: int) -> tuple[Any, ...]:
        s = self.layout.stage
        if s == 0:
            return to_device(detached(inputs), self.device)
        return self.transport.recv(s - 1, tag, "activations", batch)

    def _learn_output_spec(self, out: Any) -> None:
        if self._output_spec is None and self.layout.num_modules > 1:
            leaves, spec = tree_flatten(out)
            meta = [(tuple(t.shape[1:]), t.dtype) if isinstance(t, torch.Tensor) else t for t in leaves]
            self._output_spec = self.transport.broadcast_from_last((meta, spec))

    def _proxy(self, batch: int, requires_grad: bool) -> Any:
        if self._output_spec is None:
            self._output_spec = self.transport.broadcast_from_last(None)
        meta, spec = self._output_spec
        leaves = [
            torch.zeros((batch, *m[0]), dtype=m[1], device=self.device).requires_grad_(
                requires_grad and (m[1].is_floating_point or m[1].is_complex)
            )
            if isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], torch.dtype)
            else m
            for m in meta
        ]
        return tree_unflatten(leaves, spec)

    def sum_over_last_modules(self, value: torch.Tensor) -> torch.Tensor:
        return self.transport.sum_over_last_modules(value).to(value.device)

    # ----------------------------------------------------------------------- checkpoints

    def before_state_dict(self) -> None:
        """Make this rank's state complete: sends delivered, the gradient already sent to it received."""
        self.transport.flush()
        m, s, k = self.method, self.layout.stage, self.layout.num_modules
        if isinstance(m, StaleGradientMethod) and k > 1 and s < k - 1 and m._restored is None and m.due_next_step(s):
            grads = self.transport.recv(s + 1, TAG_GRADIENT, "the stale gradient") or None
            restored: list[Any] = [None] * (k - 1)
            restored[s] = grads if not m._discarded_last_step() else None
            m._restored = restored
            m._stepped, m._zeroed = True, False

    def model_state_dict(self, full: dict[str, torch.Tensor], local_keys: set[str]) -> dict[str, torch.Tensor]:
        self.before_state_dict()
        own = {k: v.detach().cpu() for k, v in full.items() if k in local_keys} if self.layout.replica == 0 else {}
        merged = dict(full)
        for part in self.transport.gather_objects(own):
            for key, value in part.items():
                merged[key] = value.to(full[key].device)
        return merged

    def optimizer_state_dict(self, inner: dict[str, Any], local: set[int], replay: dict[str, Any]) -> dict[str, Any]:
        """Collect every rank's part; ``replay`` must be taken after ``before_state_dict()``."""
        own = {i: _to_cpu(st) for i, st in inner["state"].items() if i in local} if self.layout.replica == 0 else {}
        mine = {"rank_state": _to_cpu(replay), "ticks": self.ticks}
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
        self.ticks = mine["ticks"]
        self._output_spec = None  # learnt again, together, at the next forward
        return mine["rank_state"]


def _batch_size(inputs: tuple[Any, ...]) -> int:
    return next((v.shape[0] for v in inputs if isinstance(v, torch.Tensor) and v.dim() > 0), 0)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
