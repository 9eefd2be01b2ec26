"""One random stream for the whole pipeline: with one process per module, every module draws what it would
draw in one process.

In one process the modules of a training step draw from one generator, in order: module 1's dropout masks,
then module 2's, ... (Features Replay's replays restore the state their play saw, so they draw nothing from
the stream).  With one process per module each process has a generator of its own, all seeded alike, so the
process of module 2 would draw module 1's masks again.  So the generator state travels with the work:

* up, with the activations: module s+1 starts from the state module s ended its forward with;
* back down to every module at the end of the step: the state after module K's forward -- what one process
  holds when the step ends.  ``bp``: with the gradient, inside backward.  ``fr`` / ``ddg``: in a message
  module K sends every other module right after its forward, taken when the step is finished
  (``optimizer.step()``, the next forward, or a collective point).

So whatever the script draws between steps (a data collator's masks, say) is the same on every rank too.
The states are the CPU generator's and, on an accelerator, the module's device generator's (one process
with every module on one device is the reference).  ``gpipe`` / ``1f1b`` draw per micro-batch, where one
process draws for the whole batch: their masks cannot be one process's, and their ranks keep their own streams.
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods.history import RngState

WORDS = 2  # values a state takes in a message: the CPU generator's, and the device's (or None)


def state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's generator state, as message values."""
    captured = RngState.capture(device)
    return captured.cpu, captured.device_state


def adopt(values: tuple[Any, ...], device: torch.device) -> None:
    """Continue from the state another module sent (``state`` of that process)."""
    cpu, device_state = values
    RngState.from_state_dict({"cpu": cpu, "device_state": device_state}, device).install()


def split(values: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """A message's values, and the generator state appended to them."""
    return values[:-WORDS], values[-WORDS:]
