"""Keep BatchNorm running statistics updated exactly once per batch.

The play pass runs every module in train mode and updates the running
statistics with the batch it sees.  The replay pass runs the same module again
on a stored batch; it must normalise with that batch's own statistics (as train
mode does) but must not count the batch a second time.  With
``track_running_stats`` switched off for the duration of the replay, PyTorch's
BatchNorm does exactly that: batch statistics, no update, no
``num_batches_tracked`` increment.  (The authors' code updates them twice.)

A graph captured by torch.export calls the BatchNorm operator itself, updates included;
its stage modules provide ``frozen_running_stats()``, which runs a variant of the graph
whose updates go to copies (``cut/split.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    modules = list(module.modules())
    frozen = [m for m in modules if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        with contextlib.ExitStack() as stack:
            for m in modules:
                if hasattr(m, "frozen_running_stats"):
                    stack.enter_context(m.frozen_running_stats())
            yield
    finally:
        for m in frozen:
            m.track_running_stats = True
