"""What Features Replay and DDG share: gradients that arrive one step late.

Both methods run every step as: for each module i < K, *advance* it on the
current batch and get back, when its pipeline is full, an output of an older
batch to back-propagate (FR recomputes it from a stored input; DDG keeps the
graph from when the batch went through).  The stale gradient that module i+1
computed one step earlier for exactly that output is pushed into it, inside the
user's ``loss.backward()`` (see ``join.py``).  The gradients w.r.t. the inputs
back-propagated this step are next step's stale gradients, one per boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..cut.partition import Stage
from .base import Method, as_leaves
from .history import detached, to_device
from .join import StaleGradients, join

Grads = tuple[torch.Tensor | None, ...]
Values = tuple[Any, ...]


def grads_of(leaves: Values) -> Grads:
    """The gradients accumulated into these input leaves (what a module sends down)."""
    return tuple(v.grad if isinstance(v, torch.Tensor) else None for v in leaves)


class StaleGradientMethod(Method):
    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(stages)
        k = len(stages)
        # Inputs back-propagated this step, as autograd leaves: after backward
        # their .grad are the gradients each module sends down for the next step.
        self._leaves: list[Values | None] = [None] * k
        self._restored: list[Grads | None] | None = None  # stale gradients from a checkpoint
        self._updated = [False] * k
        self._scale: torch.Tensor | None = None  # GradScaler scale the stale gradients carry

    def advance(self, i: int, x: Values) -> tuple[Values, tuple[Values, Values] | Callable[[], Any] | None]:
        """Run module i (< K) on this step's input ``x`` (already on its device).

        Returns the input for module i+1 (no graph) and, once module i's pipeline is
        full, ``(outputs, inputs)`` of the older batch whose stale gradient arrives now:
        outputs with a graph to back-propagate, inputs as leaves (for i > 0) -- or a
        function computing them (FR's replay), called after the input for module i+1 is
        handed on, so that module i+1, in another process, need not wait for it.
        """
        raise NotImplementedError

    def begin_step(self) -> tuple[list[Grads | None], bool]:
        """Take last step's stale gradients (and whether that step was discarded); reset per-step state."""
        stale = self.stale_gradients()
        discarded = self.discarded_last_step() and self._restored is None
        self._restored, self._leaves = None, [None] * len(self.stages)
        self.new_step()
        return stale, discarded

    def step_module(
        self,
        i: int,
        x: Values,
        stale: Any,
        outputs: list[torch.Tensor],
        grads: list[torch.Tensor],
        ratio: torch.Tensor | None = None,
    ) -> Values:
        """Advance module i (< K) on ``x`` and pair its due output with its stale gradient.

        ``stale`` is the gradient tuple, None, or a callable ``(next_input, due) -> grads``
        called right after ``advance``, so that another process can be handed the
        activations and a gradient still in flight can arrive while this module played.
        Returns the input for module i+1.
        """
        x, due = self.advance(i, x)
        if callable(stale):
            stale = stale(x, due is not None)
        if due is None:
            if stale is not None:
                raise RuntimeError(f"module {i + 1} received a stale gradient but has nothing to back-propagate")
            return x
        if stale is None:  # the pipeline is refilling after a discarded step
            return x
        out, leaves = due() if callable(due) else due
        if len(out) != len(stale):
            raise RuntimeError(f"module {i + 1} returned {len(out)} values but received {len(stale)} gradients")
        device = self.stages[i].device
        for value, grad in zip(out, stale):
            if grad is not None and isinstance(value, torch.Tensor) and value.requires_grad:
                grad = grad.to(device, non_blocking=True)
                if ratio is not None:
                    grad = grad * ratio.to(grad.device, non_blocking=True)
                outputs.append(value)
                grads.append(grad)
                self.meter.add(i, "stale_gradients", [grad])
        if i > 0:
            self._leaves[i] = leaves
        self._updated[i] = True
        return x

    def run_last(self, x: Values) -> Any:
        """Module K on this step's input, its input kept as leaves (their gradients go down)."""
        k = len(self.stages)
        if k > 1:
            x = as_leaves(x)
            self._leaves[-1] = x
        self._updated[-1] = True
        with self.meter.stage(k - 1):
            return self.stages[-1].train(*x)

    def forward(self, inputs: Values) -> Any:
        ratio = self._scale_ratio()
        stale, _ = self.begin_step()
        self._check_backward_ran(stale)
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        x = detached(inputs)
        for i, stage in enumerate(self.stages[:-1]):
            x = self.step_module(i, to_device(x, stage.device), stale[i], outputs, grads, ratio)
        out = self.run_last(to_device(x, self.stages[-1].device))
        self.account()
        return join(out, StaleGradients(outputs, grads))

    def due_next_step(self, i: int) -> bool:
        """Whether module i (< K) will have an output to back-propagate in the next step."""
        raise NotImplementedError

    def account(self) -> None:
        """Count what the method keeps between steps (histories, retained graphs) for the memory report."""

    def updated_stages(self) -> list[bool]:
        return list(self._updated)

    def on_step(self) -> None:
        super().on_step()
        self._updated = [False] * len(self.stages)
        scale = getattr(self.grad_scaler, "_scale", None)
        # GradScaler steps before it updates its scale: this is the scale of this step's gradients.
        self._scale = None if scale is None else scale.detach().clone()

    # ----------------------------------------------------------------------- stale gradients

    def stale_gradients(self) -> list[Grads | None]:
        """For each boundary i, the gradient module i+2 sent down for module i+1's output (or None)."""
        if self._restored is not None:
            return self._restored
        if self.discarded_last_step():
            return [None] * (len(self.stages) - 1)
        return [None if leaves is None else grads_of(leaves) for leaves in self._leaves[1:]]

    @property
    def restored(self) -> list[Grads | None] | None:
        """Stale gradients that arrived outside a step (from a checkpoint, or early), for the next step."""
        return self._restored

    def keep_early_gradient(self, i: int, grads: Grads | None) -> None:
        """Module i+2's gradient for module i+1 arrived before this step began (another process sent it ahead of
        a collective message): keep it for the next step, as a checkpoint would (None: that step was dropped)."""
        if self._restored is not None:
            raise RuntimeError(f"two stale gradients arrived for module {i + 1} in one step")
        restored: list[Grads | None] = [None] * (len(self.stages) - 1)
        restored[i] = grads
        self._restored = restored
        self._stepped, self._zeroed = True, False

    def input_gradients(self, i: int) -> Grads:
        """The gradients w.r.t. module i's inputs back-propagated this step (what module i sends down)."""
        leaves = self._leaves[i]
        return () if leaves is None else grads_of(leaves)

    def _check_backward_ran(self, stale: list[Grads | None]) -> None:
        for i, grads in enumerate(stale):
            if grads is not None and all(g is None for g in grads):
                raise RuntimeError(
                    f"module {i + 2} got no gradient in the previous training step: every training-mode forward "
                    "must be followed by backward(). For forwards that should not train (metrics, evaluation) "
                    "use model.eval() or torch.no_grad()"
                )

    def _scale_ratio(self) -> torch.Tensor | None:
        current = getattr(self.grad_scaler, "_scale", None)
        if current is None or self._scale is None or not self._stepped:
            return None
        return current / self._scale.to(current.device)

    # ----------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(stale_gradients=self.stale_gradients(), updated=list(self._updated), scale=self._scale)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restored = [
            None if grads is None else to_device(tuple(grads), stage.device)
            for stage, grads in zip(self.stages, state["stale_gradients"])
        ]
        self._leaves = [None] * len(self.stages)
        self._updated = list(state["updated"])
        self._scale = state["scale"]
        self._stepped, self._zeroed = True, False
