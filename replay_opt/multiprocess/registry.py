"""The ranks this process runs, and how the process ends: together, cleanly, and never orphaned.

* ``active_rank()``: the ``Rank`` of the wrapper this process trains with one process per module
  (None in one process); the Accelerate and Trainer integrations act on it.
* Exit, however the script ends: returning (``atexit``), ``accelerator.end_training()`` (patched
  in ``integrations/accelerate.py``) or ``torch.distributed.destroy_process_group()`` (patched here):
  every open rank first leaves together with the other modules -- a sync, then every posted send
  waited for -- and only then is the process group released.  A process group destroyed with
  sends in flight, or torn down during interpreter shutdown, can abort the process
  (``terminate called without an active exception``) after training finished.
* A launcher that dies (``kill -9`` of ``accelerate launch`` / ``torchrun``) leaves its ranks with
  nobody to report to: a watcher thread sees the parent change and ends the rank within a second.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
import weakref
from typing import Any

import torch.distributed as dist

from .wire import PipelineError

WATCH_SECONDS = 0.5  # how often the watcher looks at the parent process

_RANKS: weakref.WeakSet[Any] = weakref.WeakSet()  # every Rank built in this process


def register(rank: Any) -> None:
    """A rank starts: make it the active one, close it at exit, watch the launcher."""
    _RANKS.add(rank)
    atexit.register(_close_at_exit, weakref.ref(rank))
    _patch_destroy_process_group()
    _watch_launcher()


def active_rank() -> Any:
    """The ``Rank`` this process runs a module of (None in one process)."""
    live = [r for r in _RANKS if not r.closed]
    return live[-1] if live else None


def forget_all() -> list[Any]:
    """Drop every rank of this process without closing it (a test's worker reusing its process); returns them."""
    ranks = list(_RANKS)
    for rank in ranks:
        rank.mark_closed()
        _RANKS.discard(rank)
    return ranks


def close_all() -> None:
    """Every open rank leaves together with its peers (bounded by their timeouts)."""
    for rank in list(_RANKS):
        if not rank.closed:
            rank.close()


def _close_at_exit(ref: weakref.ref[Any]) -> None:
    """At interpreter exit: leave together with the other modules, then release the process group."""
    rank = ref()
    if rank is None or rank.closed:
        return
    try:
        if getattr(sys, "last_value", None) is None and dist.is_initialized():
            rank.close()
    except PipelineError as exc:
        print(f"replay_opt: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        rank.mark_closed()
        if dist.is_initialized():
            dist.destroy_process_group()


@functools.cache
def _patch_destroy_process_group() -> None:
    """``torch.distributed.destroy_process_group()`` closes the open ranks first (sends complete, peers done)."""
    destroy = dist.destroy_process_group

    @functools.wraps(destroy)
    def destroy_process_group(group: Any = None) -> None:
        if group is None or group is dist.GroupMember.WORLD:
            close_all()
        return destroy(group)

    dist.destroy_process_group = destroy_process_group
    import torch.distributed.distributed_c10d as c10d

    c10d.destroy_process_group = destroy_process_group


@functools.cache
def _watch_launcher() -> None:
    """End this rank soon after its launcher dies (its parent changes: reparented to init or a subreaper)."""
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            if os.getppid() != parent:
                print(
                    f"replay_opt: rank {os.environ.get('RANK', '?')}: the launcher (process {parent}) has exited; "
                    "stopping this rank, which has nobody left to report to",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="replay_opt-launcher-watch", daemon=True).start()
