"""Cut a model into K stage modules: a captured graph at its split points, or an ``nn.Sequential``.

A graph is cut at the first node each split-point submodule runs.  Every value alive across
a cut -- the activation, but also a residual that skips over it, an attention mask, the
labels, a shape computed early and used late -- becomes an output of the stage before the
cut and an input of the stage after it, so nothing is silently dropped.  Parameters and
buffers are never carried: each stage reads the ones it uses, *live* from the model's own
submodules, so moving the model (``.to()``, ``accelerator.prepare``) or loading a state dict
is seen by every stage.  A parameter read by two stages (an embedding tied to the LM head)
belongs to both.

Every stage is a ``StageModule``: tuple in, tuple out (the last returns the model's own
output type, a ``ModelOutput`` with ``.loss`` and ``.logits`` for instance), inputs
protected from in-place operations, and a variant that leaves running statistics alone for
replays (see ``methods/batchnorm.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec, tree_unflatten

from .capture import Graph


class StageModule(nn.Module):
    """One stage: ``body`` called on a tuple of values.

    * Inputs are protected: the first call runs on copies and watches whether the body
      modifies any of them in place (``ReLU(inplace=True)`` right after a cut, say); if it
      does, every later call runs on copies too, so stored inputs stay intact and autograd
      leaves are never modified.
    * ``out_spec`` (the last stage of a graph) rebuilds the model's output from its leaves.
    * ``frozen_running_stats()``: for graphs that update buffers themselves (torch.export
      bakes BatchNorm's update into the graph), run a variant whose updates go to copies.
    * ``number_inputs`` / ``number_outputs``: the positions of Python numbers (sizes of the
      batch, say) among the values that cross the cut, where the capture knows them
      (torch.export records every value's type); a transport that carries tensors only
      sends them as 0-dim tensors.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        last: bool,
        out_spec: TreeSpec | None = None,
        model: nn.Module | None = None,
        root_tensors: Sequence[str] = (),
        number_inputs: Sequence[int] = (),
        number_outputs: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.number_inputs, self.number_outputs = list(number_inputs), list(number_outputs)
        self.body = body
        self.last = last
        self.out_spec = out_spec
        self.mutates_inputs: bool | None = None  # unknown until the first call
        self._frozen: nn.Module | None = None
        self._freeze = False
        object.__setattr__(self, "_model", model)  # not a submodule: its parameters are not all ours
        self._root_tensors = list(root_tensors)

    def forward(self, *inputs: Any) -> Any:
        self._sync_root_tensors()
        if self.mutates_inputs is not False:
            inputs = tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in inputs)
            versions = [v._version if isinstance(v, torch.Tensor) else None for v in inputs]
        body = self._frozen_body() if self._freeze else self.body
        out = body(*inputs)
        if self.mutates_inputs is None:
            self.mutates_inputs = any(
                isinstance(v, torch.Tensor) and v._version != old for v, old in zip(inputs, versions)
            )
        if self.out_spec is not None:
            return tree_unflatten(list(out), self.out_spec)
        return out if self.last else tuple(out)

    @contextlib.contextmanager
    def frozen_running_stats(self) -> Iterator[None]:
        self._freeze = True
        try:
            yield
        finally:
            self._freeze = False

    def _frozen_body(self) -> nn.Module:
        if not isinstance(self.body, fx.GraphModule) or not _updates_buffers(self.body):
            return self.body
        if self._frozen is None:
            graph = _buffer_updates_to_copies(self.body)
            self._frozen = fx.GraphModule(self.body, graph)
        return self._frozen

    def _sync_root_tensors(self) -> None:
        # Tensors that belong to the model itself (not to a submodule) are registered here by
        # reference; pick up a replacement (a buffer moved by .to(), a state dict loaded with assign=True).
        for name in self._root_tensors:
            current = getattr(self._model, name)
            if getattr(self.body, name) is not current:
                setattr(self.body, name, current)
                if self._frozen is not None:
                    setattr(self._frozen, name, current)


# --------------------------------------------------------------------------- nn.Sequential


class _SequentialStage(nn.Module):
    """A run of an ``nn.Sequential``'s children with the tuple-in/tuple-out stage convention."""

    def __init__(self, body: nn.Sequential, last: bool) -> None:
        super().__init__()
        self.body = body
        self.last = last

    def forward(self, *inputs: Any) -> Any:
        out = self.body(*inputs)
        return out if self.last else (out,)


def split_sequential(model: nn.Sequential, split_points: list[str]) -> list[StageModule]:
    """Stages made of runs of the Sequential's children (a child object used twice counts twice)."""
    names = [name for name, child in model._modules.items() if child is not None]
    starts = [names.index(p) for p in split_points]
    if starts != sorted(starts):
        order = sorted(split_points, key=names.index)
        raise ValueError(f"split_points must follow execution order: got {split_points}, expected {order}")
    if starts and starts[0] == 0:
        raise ValueError(f"split point {split_points[0]!r} is the first layer, so module 1 would be empty")
    children = [model._modules[n] for n in names]
    bounds = [0, *starts, len(names)]
    stages = []
    for i in range(len(bounds) - 1):
        body = nn.Sequential(*children[bounds[i] : bounds[i + 1]])
        last = i == len(bounds) - 2
        stages.append(StageModule(_SequentialStage(body, last), last=True))  # tuple convention is inside
    return stages


def is_sequential_split(model: nn.Module, split_points: Sequence[str]) -> bool:
    return isinstance(model, nn.Sequential) and all(model._modules.get(p) is not None for p in split_points)


# --------------------------------------------------------------------------- graphs


def belongs_to(node: fx.Node, point: str) -> bool:
    """Whether ``node`` runs inside submodule ``point`` (or is the call of it, for fx leaves)."""
    if node.op == "call_module" and (node.target == point or str(node.target).startswith(point + ".")):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == point or path.startswith(point + ".") for path, _ in stack.values())


def order_of(graph: Graph, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """For each submodule name: (position of its first node, number of separate runs), runs 0 if never called."""
    nodes = [n for n in graph.module.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    out = {}
    for name in names:
        first, runs, inside = -1, 0, False
        for i, node in enumerate(nodes):
            here = belongs_to(node, name)
            if here and not inside:
                runs += 1
                first = i if first < 0 else first
            inside = here
        out[name] = (first, runs)
    return out


def units_in_order(graph: Graph, units: Sequence[str]) -> tuple[list[str], list[bool]]:
    """The units the graph runs, in execution order, and whether each runs once (may begin a module)."""
    order = order_of(graph, units)
    called = sorted((u for u in units if order[u][1] > 0), key=lambda u: order[u][0])
    return called, [order[u][1] == 1 for u in called]


def split_graph(graph: Graph, model: nn.Module, split_points: list[str]) -> list[StageModule]:
    """K stage modules computing, one after another, what the captured graph computes."""
    gm = graph.module
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    starts = []
    for point in split_points:
        inside = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output") and belongs_to(n, point)]
        if not inside:
            raise ValueError(
                f"split point {point!r} is never called in forward() for this call; choose a submodule that "
                "forward() runs exactly once (see wrapper.units)"
            )
        calls = [n for n in inside if n.op == "call_module" and n.target == point]
        if len(calls) > 1:
            raise ValueError(
                f"split point {point!r} is called {len(calls)} times in forward(); choose a submodule that "
                "forward() calls exactly once"
            )
        starts.append(position[inside[0]])
    if starts != sorted(starts):
        order = [p for _, p in sorted(zip(starts, split_points))]
        raise ValueError(f"split_points must follow execution order: got {split_points}, expected {order}")
    bounds = [0, *starts, len(nodes)]
    if len(bounds) > 2 and not any(n.op not in ("placeholder", "get_attr") for n in nodes[: bounds[1]]):
        raise ValueError(f"split point {split_points[0]!r} is where forward() begins, so module 1 would be empty")

    def alive_at(boundary: int) -> list[fx.Node]:
        # Values made before the cut and used after it; attributes (get_attr) are re-read, never carried.
        return [
            n for n in nodes[:boundary] if n.op != "get_attr" and any(position[user] >= boundary for user in n.users)
        ]

    stages = []
    for i in range(len(bounds) - 1):
        begin, end = bounds[i], bounds[i + 1]
        last = i == len(bounds) - 2
        stage_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}

        def lookup(node: fx.Node, stage_graph: fx.Graph = stage_graph, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            if node not in env:  # a parameter, buffer or constant read in this stage
                env[node] = stage_graph.get_attr(node.target)
            return env[node]

        if i > 0:
            for node in alive_at(begin):
                env[node] = stage_graph.placeholder(node.name)
        for node in nodes[begin:end]:
            if node.op == "get_attr" or (node.op == "output" and not last):
                continue
            env[node] = stage_graph.node_copy(node, lookup)
        if not last:
            stage_graph.output(tuple(env[n] for n in alive_at(end)))
        body, root_tensors = _live_module(stage_graph, model, gm)
        out_spec = graph.out_spec if last else None
        numbers_in = _numbers(alive_at(begin)) if i > 0 else []
        numbers_out = [] if last else _numbers(alive_at(end))
        stages.append(StageModule(body, last=last, out_spec=out_spec, model=model, root_tensors=root_tensors,
                                  number_inputs=numbers_in, number_outputs=numbers_out))  # fmt: skip
    return stages


def _numbers(values: list[fx.Node]) -> list[int]:
    kinds = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
    return [i for i, n in enumerate(values) if isinstance(n.meta.get("val"), kinds)]


def _live_module(graph: fx.Graph, model: nn.Module, captured: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule reading parameters and buffers through the model's live submodules.

    ``get_attr("a.b.weight")`` becomes ``getattr(get_attr("a.b"), "weight")`` whenever ``a.b``
    is a submodule of the model, so the stage holds the submodule, not a copy of the
    reference to its tensor.  Tensors of the model itself and constants made by the
    capture are registered directly (the former re-synced at every call).
    """
    submodules = dict(model.named_modules(remove_duplicate=False))
    root: dict[str, Any] = {}
    root_tensors = []
    for node in list(graph.nodes):
        if node.op == "call_module":
            root[node.target] = (
                submodules[node.target] if node.target in submodules else captured.get_submodule(node.target)
            )
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            if owner and owner in submodules and hasattr(submodules[owner], attr):
                with graph.inserting_after(node):
                    read = graph.call_function(getattr, (node, attr))
                node.replace_all_uses_with(read, delete_user_cb=lambda user, read=read: user is not read)
                node.target = owner
                root[owner] = submodules[owner]
            elif not owner and hasattr(model, attr) and isinstance(getattr(model, attr), torch.Tensor):
                root[attr] = getattr(model, attr)
                root_tensors.append(attr)
            else:
                root[node.target] = _fetch(captured, str(node.target))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="Stage"), root_tensors


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- buffer updates in replays

_BATCH_NORMS = {torch.ops.aten.batch_norm.default, torch.ops.aten.native_batch_norm.default}


def _updates_buffers(gm: fx.GraphModule) -> bool:
    return any(_buffer_writes(gm, node) for node in gm.graph.nodes)


def _buffer_writes(gm: fx.GraphModule, node: fx.Node) -> list[int]:
    """Positions of the arguments of ``node`` that are buffers it writes to."""
    if node.op != "call_function":
        return []
    if node.target in _BATCH_NORMS:
        # batch_norm(input, weight, bias, running_mean, running_var, training, ...): updates in train mode.
        return [3, 4] if len(node.args) > 5 and node.args[5] is True else []
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    return [
        i
        for i, (arg, spec) in enumerate(zip(node.args, schema.arguments))
        if spec.alias_info is not None and spec.alias_info.is_write and _is_buffer(gm, arg)
    ]


def _is_buffer(gm: fx.GraphModule, arg: Any) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_function" and arg.target is getattr:
        owner = _fetch(gm, str(arg.args[0].target))  # type: ignore[union-attr]
        return arg.args[1] in dict(owner.named_buffers(recurse=False))
    return arg.op == "get_attr" and not isinstance(_fetch(gm, str(arg.target)), nn.Parameter)


def _buffer_updates_to_copies(gm: fx.GraphModule) -> fx.Graph:
    """A copy of the graph whose in-place buffer updates (running statistics, counters) hit clones."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    copies = {new: old for old, new in env.items()}
    for node in list(graph.nodes):
        for i in _buffer_writes(gm, copies.get(node, node)):
            with graph.inserting_before(node):
                clone = graph.call_function(torch.ops.aten.clone.default, (node.args[i],))
            args = list(node.args)
            args[i] = clone
            node.args = tuple(args)
    graph.lint()
    return graph
