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
optimizer step until then.  Memory: no graph is kept across steps, only K-k
inputs per module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..cut.partition import Stage
from .base import as_leaves
from .batchnorm import frozen_running_stats
from .history import Entry, History, RngState
from .stale import StaleGradientMethod, Values


class FeaturesReplay(StaleGradientMethod):
    name = "fr"

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(stages)
        k = len(stages)
        # Module i keeps K-i inputs (K-k+1 in the paper's 1-based k).  The last
        # module replays what it plays, so it keeps nothing between steps.
        self.histories = [History(k - i) for i in range(k - 1)]

    def advance(self, i: int, x: Values) -> tuple[Values, Callable[[], tuple[Values, Values]] | None]:
        stage = self.stages[i]
        rng = RngState.capture(stage.device)
        with torch.no_grad():
            played = stage.train(*x)  # play: batch t, weights w^t, no graph
        oldest = self.histories[i].push(Entry(x, rng, stage.program))
        if oldest is None:
            return played, None

        def replay() -> tuple[Values, Values]:  # (called once the played activations are handed on)
            inputs = as_leaves(oldest.inputs) if i > 0 else oldest.inputs  # nobody needs the data's gradient
            with oldest.rng.restored(), stage.using(oldest.program), frozen_running_stats(stage.train), \
                    self.meter.stage(i):  # fmt: skip
                replayed = stage.train(*inputs)  # replay: input of step t-(K-k), weights w^t
            return replayed, inputs

        return played, replay

    def due_next_step(self, i: int) -> bool:
        return len(self.histories[i]) == self.histories[i].capacity - 1

    def account(self) -> None:
        for i, history in enumerate(self.histories):
            self.meter.add(i, "history", (v for entry in history for v in entry.inputs))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["histories"] = [h.state_dict() for h in self.histories]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for stage, history, entries in zip(self.stages, self.histories, state["histories"]):
            history.load_state_dict(entries, stage.device)
