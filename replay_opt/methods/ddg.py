"""Decoupled Parallel Backpropagation with delayed gradients (Huo et al., ICML 2018).

Step t: batch t goes forward through every module *with* a graph.  Module K
back-propagates the loss at once; module k < K keeps the graphs of its last
K-k batches and back-propagates, through the graph of batch t-(K-k), the
gradient module k+1 sent one step earlier -- with the activations *and the
weights* that batch saw -- then updates its current weights.  Holding K-k+1
graphs per module is what makes DDG's memory grow as O(LK): that is the point of
the comparison, so the graphs are really kept.

``optimizer.step()`` changes parameters in place, which would invalidate every
kept graph (autograd refuses to back-propagate through a tensor modified since
it was saved).  So each kept forward runs on ``p.clone()`` of every parameter:
the graph saves the copy -- the weights the batch saw -- and the clone's
backward still accumulates the gradient into ``p.grad``.

A checkpoint cannot hold autograd graphs, so it holds what rebuilds them
exactly: each kept batch's inputs, weight copies and RNG state.  After loading,
the graphs are recomputed (BatchNorm statistics frozen) on first use.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from ..cut.partition import Stage
from .base import as_leaves
from .batchnorm import frozen_running_stats
from .history import RngState, detached, to_device
from .memory import Storages
from .stale import StaleGradientMethod, Values


@dataclass
class KeptGraph:
    inputs: Values  # leaves (module > 1) the graph starts from
    rng: RngState
    weights: dict[str, torch.Tensor]  # the parameter values this batch saw (detached views of the copies)
    outputs: Values | None  # None until rebuilt after a checkpoint load
    saved: Storages = field(default_factory=dict)  # what autograd saved, for the memory report
    program: Any = None  # the captured call signature it ran under (None: the current one)


class DelayedGradients(StaleGradientMethod):
    name = "ddg"

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(stages)
        k = len(stages)
        self.graphs: list[deque[KeptGraph]] = [deque() for _ in range(k - 1)]
        self._capacity = [k - i for i in range(k - 1)]  # module i holds K-i graphs during a step

    def advance(self, i: int, x: Values) -> tuple[Values, tuple[Values, Values] | None]:
        stage = self.stages[i]
        inputs = as_leaves(x) if i > 0 else x
        rng = RngState.capture(stage.device)
        copies = {n: p.clone() for n, p in stage.train.named_parameters()}
        kept = KeptGraph(inputs, rng, {n: c.detach() for n, c in copies.items()}, None, program=stage.program)
        with self.meter.stage(i, kept.saved):
            kept.outputs = functional_call(stage.train, copies, inputs)
        graphs = self.graphs[i]
        graphs.append(kept)
        nxt = detached(kept.outputs)
        if len(graphs) < self._capacity[i]:
            return nxt, None
        oldest = graphs.popleft()
        if oldest.outputs is None:
            self._rebuild(i, oldest)
        self.meter.add_storages(i, "retained_graphs", oldest.saved)  # alive until this step's backward
        return nxt, (oldest.outputs, oldest.inputs)

    def _rebuild(self, i: int, kept: KeptGraph) -> None:
        # The saved values, with gradients that still flow to the live parameters:
        # w + (p - p.detach()) equals w exactly and has d/dp = 1.
        stage = self.stages[i]
        params = dict(stage.train.named_parameters())
        weights = {n: w + (params[n] - params[n].detach()) for n, w in kept.weights.items()}
        with (
            kept.rng.restored(),
            stage.using(kept.program),
            frozen_running_stats(stage.train),
            self.meter.stage(i, kept.saved),
        ):
            kept.outputs = functional_call(stage.train, weights, kept.inputs)

    def due_next_step(self, i: int) -> bool:
        return len(self.graphs[i]) == self._capacity[i] - 1

    def account(self) -> None:
        for i, graphs in enumerate(self.graphs):
            for kept in graphs:
                self.meter.add_storages(i, "retained_graphs", kept.saved)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["graphs"] = [
            [
                {
                    "inputs": detached(g.inputs),
                    "rng": g.rng.state_dict(),
                    "weights": g.weights,
                }
                for g in graphs
            ]
            for graphs in self.graphs
        ]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for i, (stage, saved) in enumerate(zip(self.stages, state["graphs"])):
            if len(saved) >= self._capacity[i]:
                raise ValueError(f"checkpoint holds {len(saved)} graphs for module {i + 1}; expected fewer")
            self.graphs[i] = deque(
                KeptGraph(
                    as_leaves(to_device(tuple(g["inputs"]), stage.device))
                    if i > 0
                    else to_device(tuple(g["inputs"]), stage.device),
                    RngState.from_state_dict(g["rng"], stage.device),
                    {n: w.to(stage.device) for n, w in g["weights"].items()},
                    None,
                )
                for g in saved
            )
