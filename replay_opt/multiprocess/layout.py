"""Who runs what with one process per module: the layout of ranks, the process group, the device.

Under ``accelerate launch --num_processes W`` (or ``torchrun``) with a ``ReplayModelWrapper``
of K modules, W = K x D: the ranks of replica d are ``d*K .. d*K+K-1`` (consecutive, so a
pipeline stays inside a node when K divides the GPUs per node, and only the gradient
all-reduce crosses nodes).  The replica's *first* rank runs the **last** module and the next
ranks run modules 1, 2, ..., K-1: so rank 0, Accelerate's main process, holds the real
output, the real loss and the metrics -- what ``loss.item()``, ``accelerator.log`` and a
progress bar on the main process show.  The ranks that run the same module in different
replicas form that module's data-parallel group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Who runs what: replica d holds ranks d*K..d*K+K-1; its first rank runs the last module."""

    world_size: int
    rank: int
    num_modules: int

    @property
    def replicas(self) -> int:
        return self.world_size // self.num_modules

    @property
    def stage(self) -> int:
        return (self.rank % self.num_modules - 1) % self.num_modules

    @property
    def replica(self) -> int:
        return self.rank // self.num_modules

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.num_modules + (stage + 1) % self.num_modules

    @property
    def peers(self) -> list[int]:
        """The other modules of this rank's pipeline (stage numbers)."""
        return [s for s in range(self.num_modules) if s != self.stage]

    def describe(self) -> str:
        rows = [
            f"pipeline layout: {self.world_size} ranks = {self.num_modules} modules x {self.replicas} replicas "
            "(each replica's first rank runs the last module: the real loss and metrics are on rank 0)"
        ]
        for d in range(self.replicas):
            ranks = ", ".join(f"module {s + 1}: rank {self.rank_of(s, d)}" for s in range(self.num_modules))
            rows.append(f"  replica {d}: {ranks}")
        return "\n".join(rows)


def pipeline_layout(num_modules: int, timeout: float | None = None) -> Layout | None:
    """The layout for this process, or None when not running distributed (or world size 1).

    Launched by torchrun (``WORLD_SIZE`` > 1) with no process group yet and no Accelerate,
    the process group is created here, bounded by ``timeout``.
    """
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and "MASTER_ADDR" in os.environ
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend, **kwargs)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()
    if world % num_modules:
        raise ValueError(
            f"world size {world} is not divisible by num_modules={num_modules}: launch K x D processes "
            f"(e.g. --num_processes {num_modules} for one replica, {2 * num_modules} for two)"
        )
    return Layout(world, dist.get_rank(), num_modules)


def local_device() -> torch.device:
    """This rank's device: Accelerate's when it is set up, else LOCAL_RANK's accelerator, else CPU."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return PartialState().device
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
