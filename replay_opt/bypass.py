"""No silent bypass: while a ``ReplayModelWrapper`` trains, the wrapped model's modules run only through it.

The wrapper trains the model in place, so the model's submodules stay reachable: through attribute
forwarding (``wrapper.base_model``, ``wrapper.model``, ``wrapper.lm_head``,
``wrapper.get_output_embeddings()``), through ``wrapper.module``, from a replacement of
``wrapper.forward`` or from a forward hook.  Any of them running a submodule in a training forward
would train it by plain backprop -- under the name of the method the user chose.  So:

* every submodule of the wrapped model gets a forward pre-hook that raises ``BypassError`` when it
  runs in train mode with gradients enabled anywhere but inside the wrapper's own forward (or the
  engine's work at ``optimizer.step()``, or autograd's backward, where checkpointed modules are
  recomputed);
* ``ReplayOptimizer.step()`` refuses gradients when the wrapper's own forward did not run since
  the last step (a replaced ``forward`` that computes with the parameters directly).

Evaluation (``model.eval()`` or ``torch.no_grad()``) may call submodules freely.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

FIX = (
    "Call the wrapper itself in the training loop (`out = model(**batch)`; it presents the model's forward "
    "signature and outputs), not the model or its submodules reached through it (`model.module`, "
    "`model.base_model`, `model.model`, `model.lm_head`, `model.get_output_embeddings()`); do not replace "
    "`model.forward` or call submodules from forward hooks. A forward that should not train runs under "
    "`torch.no_grad()` or after `model.eval()`."
)


class BypassError(RuntimeError):
    """A wrapped model's module trained outside the wrapper: its gradients would be plain backprop's."""


class _Depth(threading.local):
    value = 0


_inside = _Depth()


@contextlib.contextmanager
def engine_running() -> Iterator[None]:
    """The body is the engine's own work (the wrapper's forward, a step being finished): modules may run."""
    _inside.value += 1
    try:
        yield
    finally:
        _inside.value -= 1


class Guard:
    """The pre-hooks on one wrapped model, and whether they are armed (the wrapper's method, for the message).
    A model wrapped again is guarded by its newest wrapper only."""

    def __init__(self, model: nn.Module, method: str) -> None:
        earlier = _guards.get(model)
        if earlier is not None:
            earlier.remove()
        _guards[model] = self
        self.method = method
        self.armed = True
        root = type(model).__name__
        self._handles = [
            module.register_forward_pre_hook(functools.partial(_check, self, name or root, type(module).__name__))
            for name, module in model.named_modules()
        ]

    def remove(self) -> None:
        """Take the hooks off (the wrapper is released: the model trains on its own again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    # A copy of the model (copy.deepcopy, pickling) keeps the hooks, disarmed: the copy is not wrapped.
    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "armed": False, "_handles": []}

    def __deepcopy__(self, memo: dict[int, Any]) -> Guard:
        copy = Guard.__new__(Guard)
        copy.__dict__.update(self.__getstate__())
        return copy


_guards: weakref.WeakKeyDictionary[nn.Module, Guard] = weakref.WeakKeyDictionary()


def _check(guard: Guard, name: str, kind: str, module: nn.Module, args: Any) -> None:
    if (
        _inside.value
        or not guard.armed
        or not module.training
        or not torch.is_grad_enabled()
        or torch._C._current_graph_task_id() != -1  # inside backward: a checkpointed module recomputed
    ):
        return
    raise BypassError(
        f"{name} ({kind}), part of the model inside a ReplayModelWrapper, ran a training forward outside the "
        f"wrapper: it would be trained by plain backprop, not by method={guard.method!r}. {FIX}"
    )


def check_no_gradients(parameters: list[nn.Parameter], method: str) -> None:
    """``ReplayOptimizer.step()`` after no training forward of the wrapper since the last step: any gradient was
    computed around it."""
    if any(p.grad is not None for p in parameters):
        raise BypassError(
            "optimizer.step() found gradients, but the ReplayModelWrapper ran no training forward since the last "
            f"step: something computed them around the wrapper (plain backprop, not method={method!r}) -- a "
            f"replaced model.forward, say. {FIX}"
        )
