"""Cut a model into K sequential stages: split points, graph capture, balancing.

An ``nn.Sequential`` is cut between its children.  Any other model is captured
with ``torch.fx`` and its graph is cut at the first call of each split-point
submodule.  Every value that is alive across a cut -- the activation, but also a
residual that skips over it, or a shape computed early and used late -- becomes
an output of the stage before the cut and an input of the stage after it, so
nothing is silently dropped.

Without split points the model is divided into *units* (its children, with
``nn.Sequential``/``nn.ModuleList`` containers opened up, so a ResNet's units
are its stem layers and residual blocks) and K contiguous runs of units are
chosen to minimise the largest stage, weighed by parameter count or by measured
forward+backward time.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

Balance = str | Sequence[int]


@dataclass
class Stage:
    """One module of the pipeline: what runs in train mode, in eval mode, and where."""

    index: int
    train: nn.Module
    eval: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.train.parameters())

    def forward(self, training: bool, *inputs: Any) -> Any:
        return (self.train if training else self.eval)(*inputs)


@dataclass
class Partition:
    stages: list[Stage]
    split_points: list[str]
    units: list[str]


def partition(
    model: nn.Module,
    *,
    num_modules: int | None,
    split_points: Sequence[str] | None,
    balance: Balance = "params",
    example_inputs: tuple[Any, ...] | None = None,
) -> Partition:
    """Cut ``model`` into stages; see ``ReplayModelWrapper`` for the meaning of the arguments."""
    if split_points is not None:
        split_points = list(split_points)
        if num_modules is not None and num_modules != len(split_points) + 1:
            raise ValueError(
                f"num_modules={num_modules} disagrees with {len(split_points)} split points "
                f"(K modules need K-1 split points); drop num_modules or pass {num_modules - 1} split points"
            )
        num_modules = len(split_points) + 1
    if num_modules is None:
        raise ValueError("pass num_modules=K (the model is then balanced automatically) or split_points=[...]")
    if not isinstance(num_modules, int) or num_modules < 1:
        raise ValueError(f"num_modules must be a positive integer, got {num_modules!r}")

    units = candidate_units(model)
    if split_points is None:
        if num_modules > len(units):
            raise ValueError(
                f"num_modules={num_modules} but the model has only {len(units)} splittable units "
                f"({', '.join(units)}); use num_modules <= {len(units)} or pass split_points inside these units"
            )
        split_points = choose_split_points(model, units, num_modules, balance, example_inputs)
    else:
        _check_names(model, split_points)
    stages = _build_stages(model, split_points, units)
    return Partition(stages, list(split_points), units)


def candidate_units(model: nn.Module) -> list[str]:
    """Submodule names the automatic balancer may cut at, in definition order."""
    if isinstance(model, nn.Sequential):
        return [name for name, _ in model.named_children()]
    units: list[str] = []

    def expand(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qualname = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and len(child) > 0:
                expand(qualname, child)
            else:
                units.append(qualname)

    expand("", model)
    return units


def choose_split_points(
    model: nn.Module,
    units: list[str],
    num_modules: int,
    balance: Balance,
    example_inputs: tuple[Any, ...] | None,
) -> list[str]:
    if isinstance(balance, str):
        if balance == "params":
            weights = [float(sum(p.numel() for p in model.get_submodule(u).parameters())) for u in units]
        elif balance == "time":
            if example_inputs is None:
                raise ValueError(
                    'balance="time" profiles each unit and needs example_inputs=(x,) with a batch like the '
                    'training batches; pass it, or use the default balance="params"'
                )
            from .plan import profile  # the planner's profiler: forward + backward time per unit

            weights = [u.forward_s + u.backward_s for u in profile(model, example_inputs)]
        else:
            raise ValueError(f'balance must be "params", "time" or a list of unit counts, got {balance!r}')
        starts = balanced_starts(weights, num_modules)
    else:
        counts = list(balance)
        if (
            len(counts) != num_modules
            or any(not isinstance(c, int) or c < 1 for c in counts)
            or sum(counts) != len(units)
        ):
            raise ValueError(
                f"balance={counts!r} must list {num_modules} positive unit counts summing to {len(units)} "
                f"(the model's units: {', '.join(units)})"
            )
        starts = [sum(counts[:i]) for i in range(1, num_modules)]
    return [units[i] for i in starts]


def balanced_starts(weights: Sequence[float], parts: int) -> list[int]:
    """Indices at which parts 2..K begin, minimising the heaviest contiguous part (exact DP)."""
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    return min_max_cut(len(weights), parts, lambda i, j, last: prefix[j] - prefix[i])


def min_max_cut(n: int, parts: int, cost: Callable[[int, int, bool], float]) -> list[int]:
    """Start indices of parts 2..K of items 0..n-1 minimising the largest ``cost(i, j, last)`` of a
    part made of items i..j-1 (``last``: it is the final part).  Exact dynamic programming."""
    inf = float("inf")
    # best[p][j]: smallest possible largest cost when the first j items form p parts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n + 1):
            if p == parts and j != n:
                continue
            for i in range(p - 1, j):
                c = max(best[p - 1][i], cost(i, j, p == parts))
                if c < best[p][j]:
                    best[p][j], cut[p][j] = c, i
    starts, j = [], n
    for p in range(parts, 1, -1):
        j = cut[p][j]
        starts.append(j)
    return starts[::-1]


def _check_names(model: nn.Module, split_points: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for point in split_points:
        if point not in names:
            close = difflib.get_close_matches(point, names, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"split point {point!r} is not a submodule name of {type(model).__name__} "
                f"(names as in model.named_modules()){hint}"
            )
    if len(set(split_points)) != len(split_points):
        raise ValueError(f"split_points lists a name twice: {split_points}")
    for a in split_points:
        for b in split_points:
            if b.startswith(a + "."):
                raise ValueError(
                    f"split point {b!r} lies inside split point {a!r}; a split point cannot contain another"
                )


# --------------------------------------------------------------------------- building stages


def _build_stages(model: nn.Module, split_points: list[str], units: list[str]) -> list[Stage]:
    if isinstance(model, nn.Sequential) and all(p in dict(model.named_children()) for p in split_points):
        return _split_sequential(model, split_points)
    # Units that hold no split point run as opaque calls: fewer things to trace, same function.
    leaves = set(split_points) | {u for u in units if not any(p.startswith(u + ".") for p in split_points)}
    was_training = {m: m.training for m in model.modules()}
    try:
        model.train()
        train = _split_traced(_trace(model, leaves), split_points)
        # fx bakes `self.training` into the graph, so eval mode gets a graph of its own.
        model.eval()
        evals = _split_traced(_trace(model, leaves), split_points)
    finally:
        for m, mode in was_training.items():
            m.training = mode
    return [Stage(i, t, e) for i, (t, e) in enumerate(zip(train, evals))]


def _split_sequential(model: nn.Sequential, split_points: list[str]) -> list[Stage]:
    names = [name for name, _ in model.named_children()]
    starts = [names.index(p) for p in split_points]
    if starts != sorted(starts):
        order = sorted(split_points, key=names.index)
        raise ValueError(f"split_points must follow execution order: got {split_points}, expected {order}")
    if starts and starts[0] == 0:
        raise ValueError(f"split point {split_points[0]!r} is the first layer, so module 1 would be empty")
    bounds = [0, *starts, len(names)]
    stages = []
    for i in range(len(bounds) - 1):
        body = nn.Sequential(*[model[j] for j in range(bounds[i], bounds[i + 1])])
        module = _SequentialStage(body, last=i == len(bounds) - 2)
        stages.append(Stage(i, module, module))
    return stages


class _SequentialStage(nn.Module):
    """A run of an ``nn.Sequential``'s children with the tuple-in/tuple-out stage convention."""

    def __init__(self, body: nn.Sequential, last: bool) -> None:
        super().__init__()
        self.body = body
        self.last = last

    def forward(self, *inputs: Any) -> Any:
        out = self.body(*inputs)
        return out if self.last else (out,)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, leaves: set[str]) -> fx.GraphModule:
    try:
        graph = _Tracer(leaves).trace(model)
    except Exception as exc:
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}). Fixes: express the "
            "model as nn.Sequential; or make the untraceable code part of a unit that is not cut (submodules listed "
            "as units are called as a whole, not traced); or mark helper functions with torch.fx.wrap"
        ) from exc
    return fx.GraphModule(model, graph)


def _split_traced(gm: fx.GraphModule, split_points: list[str]) -> list[fx.GraphModule]:
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    starts = []
    for point in split_points:
        calls = [n for n in nodes if n.op == "call_module" and n.target == point]
        if len(calls) != 1:
            why = "is never called in forward()" if not calls else f"is called {len(calls)} times in forward()"
            raise ValueError(f"split point {point!r} {why}; choose a submodule that forward() calls exactly once")
        starts.append(position[calls[0]])
    if starts != sorted(starts):
        order = [p for _, p in sorted(zip(starts, split_points))]
        raise ValueError(f"split_points must follow execution order: got {split_points}, expected {order}")
    bounds = [0, *starts, len(nodes)]
    if not any(n.op not in ("placeholder", "get_attr") for n in nodes[: bounds[1]]) and len(bounds) > 2:
        raise ValueError(f"split point {split_points[0]!r} is where forward() begins, so module 1 would be empty")

    def alive_at(boundary: int) -> list[fx.Node]:
        # Values made before the cut and used after it; parameters (get_attr) are re-read, never carried.
        return [
            n for n in nodes[:boundary] if n.op != "get_attr" and any(position[user] >= boundary for user in n.users)
        ]

    stages = []
    for i in range(len(bounds) - 1):
        begin, end = bounds[i], bounds[i + 1]
        last = i == len(bounds) - 2
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}

        def lookup(node: fx.Node, graph: fx.Graph = graph, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            if node not in env:  # a parameter or buffer read in this stage
                env[node] = graph.get_attr(node.target)
            return env[node]

        if i > 0:
            for node in alive_at(begin):
                env[node] = graph.placeholder(node.name)
        for node in nodes[begin:end]:
            if node.op == "get_attr":
                continue
            env[node] = graph.node_copy(node, lookup)
        if not last:
            graph.output(tuple(env[n] for n in alive_at(end)))
        graph.lint()
        stages.append(fx.GraphModule(gm, graph, class_name=f"Stage{i}"))
    return stages
