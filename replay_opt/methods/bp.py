"""Plain backpropagation through the same API: the reference every method is compared with."""

from __future__ import annotations

from typing import Any

from .base import Method


class Backprop(Method):
    """Forward through every stage with one graph; ``loss.backward()`` runs the whole backward pass.

    With stages on several devices this is naive model parallelism: each device
    waits for the others in both passes (backward locking).
    """

    name = "bp"

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        x = inputs
        for stage in self.stages[:-1]:
            x = self.run_stage(stage, x)
        return self.run_stage(self.stages[-1], x)


class GPipe(Backprop):
    """Exact micro-batched pipelining with torch.distributed.pipelining's ``ScheduleGPipe``, one process per
    module (see ``replay_opt/multiprocess/schedules.py``).  The multi-process pipeline runs it; ``microbatches``
    is set by the wrapper."""

    name = "gpipe"
    microbatches = 1

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        raise RuntimeError(f"method={self.name!r} runs with one process per module")


class OneFOneB(GPipe):
    """The same with ``Schedule1F1B``: one forward, one backward in the steady state (less memory)."""

    name = "1f1b"
