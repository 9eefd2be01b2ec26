"""Features Replay (Huo, Gu & Huang, NeurIPS 2018, Algorithm 1).

Step t, modules k = 1..K (here 0-based, i = k-1):

* play    -- every module runs forward on batch t with the current weights w^t,
             keeping no graph, and stores its input (with the RNG state);
* replay  -- module k < K re-runs, with w^t and a graph, the input it stored at
             step t-(K-k) and back-propagates the gradient that module k+1
             computed at step t-1 for exactly that tensor; module K simply runs
             batch t with a graph and gets the true loss gradient;
* send    -- the gradient w.r.t. each replayed input goes down one module, to
             be used at step t+1.

No module waits for another in the backward pass, so all backward passes can
run at once.  Module k has nothing to replay before step K-k and takes no
optimizer step until then.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batchnorm import frozen_running_stats
from ..history import Entry, History, RngState, to_device
from ..join import StaleGradients, join
from .base import Method, as_leaves

Grads = tuple[torch.Tensor | None, ...]


class FeaturesReplay(Method):
    name = "fr"

    def __init__(self, stages: list[Any]) -> None:
        super().__init__(stages)
        k = len(stages)
        # Module i keeps K-i inputs (K-k+1 in the paper's 1-based k).  The last
        # module replays what it plays, so it keeps nothing between steps.
        self.histories = [History(k - i) for i in range(k - 1)]
        # Inputs of this step's replays as autograd leaves: after backward, their
        # .grad are the gradients each module sends down for the next step.
        self._leaves: list[tuple[Any, ...] | None] = [None] * k
        self._restored: list[Grads | None] | None = None  # stale gradients from a checkpoint
        self._updated = [False] * k
        self._stepped = False  # an optimizer step since the last training forward
        self._zeroed = False  # a zero_grad since the last training forward
        self._scale: torch.Tensor | None = None  # GradScaler scale the stale gradients carry

    # ----------------------------------------------------------------------- step

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        stale = self.stale_gradients()
        self._check_backward_ran(stale)
        ratio = self._scale_ratio()
        self._restored, self._leaves = None, [None] * len(self.stages)
        self._stepped = self._zeroed = False

        replayed: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        x = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in inputs)
        for i, stage in enumerate(self.stages[:-1]):
            x = to_device(x, stage.device)
            rng = RngState.capture(stage.device)
            with torch.no_grad():
                played = stage.train(*x)  # play: batch t, weights w^t, no graph
            oldest = self.histories[i].push(Entry(x, rng))
            if oldest is not None and stale[i] is not None:
                self._replay(i, oldest, stale[i], ratio, replayed, grads)
            elif oldest is None and stale[i] is not None:
                raise RuntimeError(f"module {i + 1} received a stale gradient but has no stored input to replay")
            x = played

        last = self.stages[-1]
        x = to_device(x, last.device)
        if len(self.stages) > 1:
            x = as_leaves(x)
            self._leaves[-1] = x
        self._updated[-1] = True
        return join(last.train(*x), StaleGradients(replayed, grads))

    def _replay(
        self,
        i: int,
        entry: Entry,
        stale: Grads,
        ratio: torch.Tensor | None,
        replayed: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> None:
        stage = self.stages[i]
        inputs = as_leaves(entry.inputs) if i > 0 else entry.inputs  # nobody needs the data's gradient
        with entry.rng.restored(), frozen_running_stats(stage.train):
            out = stage.train(*inputs)  # replay: input of step t-(K-k), weights w^t
        if len(out) != len(stale):
            raise RuntimeError(f"module {i + 1} returned {len(out)} values but received {len(stale)} gradients")
        for value, grad in zip(out, stale):
            if grad is not None and isinstance(value, torch.Tensor) and value.requires_grad:
                grad = grad.to(stage.device, non_blocking=True)
                if ratio is not None:
                    grad = grad * ratio.to(grad.device, non_blocking=True)
                replayed.append(value)
                grads.append(grad)
        if i > 0:
            self._leaves[i] = inputs
        self._updated[i] = True

    def updated_stages(self) -> list[bool]:
        return list(self._updated)

    def on_step(self) -> None:
        super().on_step()
        self._updated = [False] * len(self.stages)
        self._stepped = True
        scale = getattr(self.grad_scaler, "_scale", None)
        # GradScaler steps before it updates its scale: this is the scale of this step's gradients.
        self._scale = None if scale is None else scale.detach().clone()

    def on_zero_grad(self) -> None:
        self._zeroed = True

    # ----------------------------------------------------------------------- stale gradients

    def _discarded_last_step(self) -> bool:
        # zero_grad() without step(): the user (or a GradScaler skipping an
        # overflowing step) threw that step's gradients away, stale ones included.
        return self._zeroed and not self._stepped

    def stale_gradients(self) -> list[Grads | None]:
        """For each boundary i, the gradient module i+2 sent down for module i+1's output (or None)."""
        if self._restored is not None:
            return self._restored
        if self._discarded_last_step():
            return [None] * (len(self.stages) - 1)
        return [
            None if leaves is None else tuple(v.grad if isinstance(v, torch.Tensor) else None for v in leaves)
            for leaves in self._leaves[1:]
        ]

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
        state.update(
            histories=[h.state_dict() for h in self.histories],
            stale_gradients=self.stale_gradients(),
            updated=list(self._updated),
            scale=self._scale,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for stage, history, entries in zip(self.stages, self.histories, state["histories"]):
            history.load_state_dict(entries, stage.device)
        self._restored = [
            None if grads is None else to_device(tuple(grads), stage.device)
            for stage, grads in zip(self.stages, state["stale_gradients"])
        ]
        self._leaves = [None] * len(self.stages)
        self._updated = list(state["updated"])
        self._scale = state["scale"]
        self._stepped, self._zeroed = True, False
