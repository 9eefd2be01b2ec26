"""Bounded input histories, each entry with the RNG state its play pass saw.

Features Replay runs a module twice on the same input: once in the *play* pass
(forward, no graph) and again, K-k steps later, in the *replay* pass (forward
with a graph, then backward).  For the replay to recompute the same function,
random draws (dropout, stochastic depth, ...) must repeat, so every stored
input carries the generator state from just before its play pass, exactly as
``torch.utils.checkpoint`` does for recomputation.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RngState:
    """The CPU generator state and, for an accelerator, that device's state."""

    cpu: torch.Tensor
    device: torch.device
    device_state: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        device_state = None
        if device.type != "cpu":
            device_state = torch.get_device_module(device.type).get_rng_state(device)
        return cls(torch.get_rng_state(), device, device_state)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the body with this state, then give the global generators back untouched."""
        devices = [] if self.device_state is None else [self.device]
        device_type = "cuda" if self.device_state is None else self.device.type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            self.install()
            yield

    def install(self) -> None:
        """Make this the global generators' state (for good: the random stream continues from it)."""
        torch.set_rng_state(self.cpu)
        if self.device_state is not None:
            torch.get_device_module(self.device.type).set_rng_state(self.device_state, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "device": str(self.device), "device_state": self.device_state}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> RngState:
        # Generator states must be CPU byte tensors, whatever device a loader moved them to.
        device_state = state["device_state"]
        if device_state is not None:
            device_state = device_state.cpu()
        return cls(state["cpu"].cpu(), device, device_state)


@dataclass
class Entry:
    """One stored module input: the values the module was called with, the RNG state, and the
    program (captured call signature) it ran under -- None: whichever is current."""

    inputs: tuple[Any, ...]
    rng: RngState
    program: Any = None


class History:
    """The last ``capacity`` inputs of one module, oldest first.

    Module k of K keeps K-k+1 inputs: the one played now and the K-k older ones
    still waiting for their stale gradient.  ``push`` returns the entry that
    falls out, which is the one to replay this step once the history is full.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a history holds at least one input, got capacity={capacity}")
        self.capacity = capacity
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def push(self, entry: Entry) -> Entry | None:
        self._entries.append(entry)
        if len(self._entries) == self.capacity:
            return self._entries.popleft()
        return None

    def clear(self) -> None:
        self._entries.clear()

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"inputs": e.inputs, "rng": e.rng.state_dict()} for e in self._entries]

    def load_state_dict(self, entries: list[dict[str, Any]], device: torch.device) -> None:
        if len(entries) >= self.capacity:
            raise ValueError(
                f"checkpointed history holds {len(entries)} inputs but this module keeps at most "
                f"{self.capacity - 1} between steps; was it saved with a different num_modules?"
            )
        self._entries = deque(
            Entry(to_device(tuple(e["inputs"]), device), RngState.from_state_dict(e["rng"], device)) for e in entries
        )


def detached(values: Any) -> tuple[Any, ...]:
    """``values`` as a tuple, its tensors cut from any autograd graph (storage shared)."""
    return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in values)


def to_device(values: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """Move the tensors among ``values`` to ``device`` without blocking the host."""
    return tuple(
        v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v for v in values
    )
