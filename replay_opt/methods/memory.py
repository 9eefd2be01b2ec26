"""Memory accounting: the bytes each module holds for its backward pass.

The comparison the paper makes (Table 1, Figure 5) is about memory held for
backward: activations saved by autograd graphs (one graph per module for BP and
FR, K-k+1 graphs for DDG's module k), stored inputs (FR's histories), and the
gradients in flight between modules.  With ``track_memory`` on, the wrapper
counts, for the last training step, each of these per module, on any device:

* ``activations`` -- tensors autograd saved while this step's graphs were built,
  found with ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded;
  DDG's copies of the weights its old graphs saw are included);
* ``retained_graphs`` -- the same, for graphs kept from earlier steps (DDG);
* ``history`` -- stored inputs waiting to be replayed (FR);
* ``stale_gradients`` -- gradients pushed into the module this step.

Every storage is counted once, in the first category that reaches it, so a
replayed input that autograd also saves is not counted twice.  A graph kept
from a step during which accounting was off cannot be counted: the report then
says ``complete: False`` (turn accounting on K steps before reading it).  Peak device
memory comes from ``torch.cuda.max_memory_allocated`` for each CUDA device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

CATEGORIES = ("activations", "retained_graphs", "history", "stale_gradients")
Storages = dict[int, int]  # storage data_ptr -> bytes


class MemoryMeter:
    def __init__(self, num_modules: int) -> None:
        self.enabled = False
        self.num_modules = num_modules
        self._seen: set[int] = set()
        self._bytes = [dict.fromkeys(CATEGORIES, 0) for _ in range(num_modules)]
        self.devices: list[torch.device] = []
        self.complete = True  # False when a kept graph predates accounting

    def begin_step(self) -> None:
        if self.enabled:
            self._seen = set()
            self._bytes = [dict.fromkeys(CATEGORIES, 0) for _ in range(self.num_modules)]
            self.complete = True

    @contextlib.contextmanager
    def stage(self, index: int, record: Storages | None = None) -> Iterator[None]:
        """Count what autograd saves inside the body as module ``index``'s activations.

        ``record``, when given, also receives the storages (to re-count a graph kept for later steps).
        """
        if not self.enabled:
            yield
            return

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, nn.Parameter):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if record is not None:
                    record[key] = size
                self._count(index, "activations", key, size)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def add(self, index: int, category: str, tensors: Iterable[Any]) -> None:
        if self.enabled:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    self._count(index, category, storage.data_ptr(), storage.nbytes())

    def add_storages(self, index: int, category: str, storages: Storages) -> None:
        if self.enabled:
            self.complete = self.complete and bool(storages)
            for key, size in storages.items():
                self._count(index, category, key, size)

    def _count(self, index: int, category: str, key: int, size: int) -> None:
        if key and key not in self._seen:
            self._seen.add(key)
            self._bytes[index][category] += size

    def report(self) -> dict[str, Any]:
        modules = [{**b, "total": sum(b.values())} for b in self._bytes]
        cuda = {
            str(d): torch.cuda.max_memory_allocated(d) for d in sorted(set(self.devices), key=str) if d.type == "cuda"
        }
        return {
            "complete": self.complete,
            "modules": modules,
            "total": sum(m["total"] for m in modules),
            **{c: sum(m[c] for m in modules) for c in CATEGORIES},
            "cuda_max_memory_allocated": cuda,
        }
