"""Fold the replays' backward passes into the user's ``loss.backward()``.

In a training step the user back-propagates the loss through the last module
only.  The other modules must back-propagate their replayed outputs with the
stale gradients from the step before.  Rather than a second autograd call after
the user's, the model output is passed through ``_Join``, an identity whose
inputs also include the replayed outputs; its backward hands the stale
gradients to them.  One ``backward()`` thus covers every module, and the
autograd engine runs each device's part on that device's own thread, in
parallel, as soon as its gradient is ready.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map_only


class StaleGradients:
    """Replayed outputs and the gradients to push into them, delivered once per step.

    ``grads`` may be a callable returning them, called inside the backward pass (the
    multi-process ``method="bp"``: the gradient of this step's output, which the next
    process is computing meanwhile).  ``on_backward``, when given, runs once when the
    whole backward pass has finished (after every gradient, on every device, is in
    place): the multi-process pipeline sends its gradients down there.
    """

    def __init__(
        self,
        outputs: list[torch.Tensor],
        grads: list[torch.Tensor] | Callable[[], list[torch.Tensor | None]],
        on_backward: Callable[[], None] | None = None,
    ) -> None:
        self.outputs = outputs
        self.grads = grads
        self.on_backward = on_backward
        self.delivered = False


class _Join(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, stale: StaleGradients, output: torch.Tensor, *replayed: torch.Tensor) -> torch.Tensor:
        ctx.stale = stale
        # An alias, not a view: the caller may change the output in place (Trainer's ``loss *= n``,
        # ``loss /= accumulation_steps``) as with the model's own output; no copy of large logits.
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        stale: StaleGradients = ctx.stale
        # Every tensor of the output carries a join; whichever the loss reaches first delivers.
        if stale.delivered:
            return (None, grad_output, *(None for _ in stale.outputs))
        stale.delivered = True
        if stale.on_backward is not None:
            torch.autograd.Variable._execution_engine.queue_callback(stale.on_backward)
        grads = stale.grads() if callable(stale.grads) else stale.grads
        return (None, grad_output, *grads)


def join(output: Any, stale: StaleGradients) -> Any:
    """Return ``output`` unchanged in value, wired so that its backward also runs the replays."""
    if not stale.outputs and stale.on_backward is None:
        return output

    def attach(t: torch.Tensor) -> torch.Tensor:
        return _Join.apply(stale, t, *stale.outputs) if t.requires_grad else t

    return tree_map_only(torch.Tensor, attach, output)
