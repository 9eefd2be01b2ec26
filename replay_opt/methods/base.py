"""The small interface through which ``ReplayModelWrapper`` drives a training method."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..cut.partition import Stage
from .history import to_device
from .memory import MemoryMeter


class Method:
    """How one training step runs through the K stages.

    The wrapper calls ``forward`` for every training-mode forward with gradients
    enabled; ``ReplayOptimizer`` calls ``bind`` once, ``before_step`` and
    ``updated_stages`` just before the inner optimizer steps (stages marked
    False get no update at all), then ``on_step``; ``on_zero_grad`` when
    gradients are cleared.  ``state_dict``
    carries whatever the method keeps between steps, so that a resumed run
    continues identically.
    """

    name: ClassVar[str]
    grad_scaler: Any = None  # a torch.amp.GradScaler, set by ReplayOptimizer

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.steps = 0
        self.meter = MemoryMeter(len(stages))

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once by ReplayOptimizer with the optimizer it wraps."""

    def before_step(self) -> None:
        """Called by ReplayOptimizer.step before the inner optimizer steps."""

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def updated_stages(self) -> list[bool]:
        return [True] * len(self.stages)

    _stepped = False  # an optimizer step since the last training forward
    _zeroed = False  # a zero_grad since the last training forward

    def on_step(self) -> None:
        self.steps += 1
        self._stepped = True

    def on_zero_grad(self) -> None:
        self._zeroed = True

    def new_step(self) -> None:
        """A training forward begins: forget the last step's ``step()`` / ``zero_grad()`` calls."""
        self._stepped = self._zeroed = False

    def discarded_last_step(self) -> bool:
        """Whether ``zero_grad()`` came without ``step()`` since the last training forward: the user (or a
        GradScaler skipping an overflowing step) threw that step's gradients away."""
        return self._zeroed and not self._stepped

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "num_modules": len(self.stages), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name or state.get("num_modules") != len(self.stages):
            raise ValueError(
                f"checkpoint holds replay state of method={state.get('method')!r} with "
                f"num_modules={state.get('num_modules')}, but this model uses method={self.name!r} with "
                f"num_modules={len(self.stages)}; build the wrapper as it was when the checkpoint was saved"
            )
        self.steps = int(state["steps"])

    def run_stage(self, stage: Stage, inputs: tuple[Any, ...]) -> Any:
        with self.meter.stage(stage.index):
            return stage.train(*to_device(inputs, stage.device))


def as_leaves(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh autograd leaves for the floating-point tensors among ``values`` (storage shared)."""
    return tuple(
        v.detach().requires_grad_() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) else v
        for v in values
    )
