"""Graph capture: one call of a model as an fx graph, flat tensors in, flat output leaves out.

Two tracers, tried in this order (``capture="auto"``):

* ``torch.fx`` symbolic tracing, with the model's units as leaves: a unit is called whole,
  so code inside it need not be traceable, and the stages compute exactly what eager
  PyTorch computes.  Fast (milliseconds).
* ``torch.export`` (non-strict), which runs the model's Python with fake tensors and
  records every operator -- through the decorators transformers puts on every
  ``forward`` -- with the batch and sequence dimensions dynamic, so a smaller last batch
  or a new sequence length reuses the graph.  Seconds.

Tracing bakes Python values into the graph: whether an optional argument is ``None``
(``labels``, ``attention_mask``), flags (``return_dict``), ``self.training``.  So a graph
belongs to one *call signature*: the arguments bound to ``forward``'s signature with
their defaults, tensors described by dtype and rank, everything else by value, and the
train/eval mode.  The caller keeps a small cache of graphs by signature (see
``partition.py``); an exported graph also records the shapes it accepts (a size-1 batch
is specialised, say) and is recaptured, once, for inputs outside them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import time
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

TRACERS = ("auto", "fx", "export")


class CaptureError(ValueError):
    """No tracer could capture the model; the message lists each tracer's failure and the fixes."""


class Call:
    """One call of the model, the object that flows from ``wrapper.forward`` to the modules.

    Its inputs canonical -- bound to ``forward``'s signature (defaults applied), flattened: ``leaves`` and
    ``spec``, the ``tensors`` among them -- and what every layer asks of a call: its graph ``key`` (the
    signature a captured program belongs to), its ``shape_key`` (what decides the output's shapes), its
    ``batch_size``, and ``inputs``, module 1's inputs under the program the partition selected for it.
    """

    inputs: tuple[Any, ...] = ()  # module 1's inputs, set by ``Partition.select``

    def __init__(self, signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._named: list[tuple[str, Any]] = [(f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            self._named = [(n, v) for n, v in bound.arguments.items() if not isinstance(v, dict)]
            self._named += [item for v in bound.arguments.values() if isinstance(v, dict) for item in v.items()]
            bound.apply_defaults()
            args, kwargs = bound.args, bound.kwargs
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.leaves, self.spec = tree_flatten((self.args, self.kwargs))
        self.tensors = tuple(v for v in self.leaves if isinstance(v, torch.Tensor))

    def key(self, training: bool) -> Hashable:
        """What every graph depends on: the mode, the autocast state (torch.export records the casts), the
        structure, which leaves are tensors, the other values.

        (An exported graph also depends on the tensors' dtypes, ranks, devices and shapes: ``Program.fits``.)
        """
        return (training, autocast_state(), str(self.spec), tuple(_describe(v) for v in self.leaves))

    def with_tensors(self, tensors: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of this call with its tensors replaced, in order, by ``tensors``."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(v, torch.Tensor) else v for v in self.leaves]
        return tree_unflatten(leaves, self.spec)

    def shape_key(self) -> Hashable:
        """The structure, and each leaf's shape and dtype (tensors) or value: what decides the output's shapes."""
        return str(self.spec), tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)
                                     for v in self.leaves)  # fmt: skip

    def batch_size(self) -> int:
        """The first dimension of the first tensor with one (0 when none has)."""
        return next((t.shape[0] for t in self.tensors if t.dim() > 0), 0)

    def describe(self) -> str:
        """The arguments as the caller passed them: ``input_ids=Tensor(4, 12), labels=Tensor(4, 12)``."""
        parts = []
        for name, value in self._named:
            if isinstance(value, torch.Tensor):
                parts.append(f"{name}=Tensor{tuple(value.shape)}")
            elif value is not None:
                parts.append(f"{name}={value!r}"[:60])
        return ", ".join(parts)


def autocast_state() -> tuple[Any, ...]:
    """The autocast dtype per device type where autocast is on (a captured graph bakes the casts in)."""
    return tuple(
        (device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)
    )


KEYWORD_ONLY = sys.maxsize  # ``use_cache_position`` of a model that takes ``use_cache`` through ``**kwargs``


def use_cache_position(signature: inspect.Signature | None, model: nn.Module | None = None) -> int | None:
    """Where ``forward`` takes ``use_cache`` (transformers models), or None.  A model whose ``forward`` hands its
    ``**kwargs`` to a base model that takes it (PEFT's ``PeftModel``: ``get_base_model()``) takes it by keyword."""
    names = list(signature.parameters) if signature is not None else []
    if "use_cache" in names:
        return names.index("use_cache")
    var_keyword = signature is not None and any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    get_base = getattr(model, "get_base_model", None)
    if var_keyword and callable(get_base):
        try:
            if "use_cache" in inspect.signature(get_base().forward).parameters:
                return KEYWORD_ONLY
        except (TypeError, ValueError):
            pass
    return None


def without_cache(position: int | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_cache=False`` where ``forward`` takes ``use_cache`` at ``position`` (see
    ``use_cache_position``): a cache is not a tensor that can cross a cut, and running the model through the cut
    (training, evaluating, timing its units) never reads it.  Unchanged when the call gives it positionally."""
    if position is None or position < len(args) or kwargs.get("use_cache") is False:
        return kwargs
    return {**kwargs, "use_cache": False}


def as_call(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from example inputs: a tuple of positional inputs, a dict of keyword inputs, or one tensor."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def example_call(signature: inspect.Signature | None, example: Any) -> Call:
    return Call(signature, *as_call(example))


def _describe(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor",)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return ("value", type(value).__name__, value)
    return ("object", type(value).__qualname__, id(value))


def signature_of(model: nn.Module) -> inspect.Signature | None:
    """``forward``'s signature, or None when it takes only ``*args`` (nothing to bind)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in signature.parameters.values()}
    return None if kinds <= {inspect.Parameter.VAR_POSITIONAL} else signature


@dataclass
class Graph:
    """A captured call: placeholders are the call's tensors, in order; the output is a tuple of leaves."""

    module: fx.GraphModule
    out_spec: TreeSpec
    tracer: str
    seconds: float
    exported: Any = None  # the ExportedProgram (export), for the shape check

    def fits(self, call: Call) -> bool:
        """Whether the call's tensors have the dtypes, ranks, devices and shapes an exported graph was
        specialised to (an fx graph depends on none of them)."""
        if self.exported is None:
            return True
        from torch._export.utils import _check_input_constraints_for_graph

        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        metas = [(t.dtype, t.dim(), t.device) for t in call.tensors]
        if metas != [(n.meta["val"].dtype, n.meta["val"].dim(), n.meta["val"].device) for n in placeholders]:
            return False
        try:
            _check_input_constraints_for_graph(
                placeholders, [((), t) for t in call.tensors], self.exported.range_constraints
            )
        except Exception:  # any violated constraint: capture again for these shapes
            return False
        return True


# Exported graphs by model object and call signature: wrapping the same model again (another K,
# balance="time" then training, the planner) does not export it again.  Weak: dies with the model.
_EXPORTED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Graph]] = weakref.WeakKeyDictionary()


def capture(model: nn.Module, call: Call, training: bool, *, leaves: set[str], tracer: str = "auto") -> Graph:
    """Trace ``model`` on ``call`` in train or eval mode.  ``leaves``: submodules fx calls whole."""
    if tracer not in TRACERS:
        raise ValueError(f"capture must be one of {TRACERS}, got {tracer!r}")
    key = call.key(training)
    failures: dict[str, BaseException] = {}
    for name in ("fx", "export") if tracer == "auto" else (tracer,):
        cached = _EXPORTED.get(model, {}).get(key) if name == "export" else None
        if cached is not None and cached.fits(call):
            return cached
        start = time.perf_counter()
        try:
            with training_mode(model, training), torch.random.fork_rng(devices=[]):
                module, out_spec, exported = (_trace_fx if name == "fx" else _trace_export)(model, call, leaves)
        except Exception as exc:  # a tracer's own failure: try the next one, report all
            failures[name] = exc
            logger.debug("%s could not capture %s: %s", name, type(model).__name__, exc)
            continue
        seconds = time.perf_counter() - start
        logger.info("captured %s (%s mode) with %s in %.2f s", type(model).__name__,
                    "train" if training else "eval", name, seconds)  # fmt: skip
        graph = Graph(module, out_spec, name, seconds, exported)
        if exported is not None:
            _EXPORTED.setdefault(model, {})[key] = graph
        return graph
    raise CaptureError(_explain(model, call, failures))


def _explain(model: nn.Module, call: Call, failures: dict[str, BaseException]) -> str:
    name = type(model).__name__
    lines = [f"{name} could not be captured as a graph for the call ({call.describe()}):"]
    for tracer, exc in failures.items():
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        lines.append(f"  {tracer}: {type(exc).__name__}: {first[:300]}")
    returned = _returned_object(failures)
    if returned is not None:
        lines.append(
            f"The model returns a {returned}, which is not a tensor and cannot cross a cut. "
            + ("A cache: call the model with use_cache=False, or set model.config.use_cache = False before "
               "wrapping. " if "Cache" in returned else "")
            + "Return tensors (or None) instead, or register the type as a pytree node "
            "(torch.utils._pytree.register_pytree_node) so that its tensors can be found."
        )  # fmt: skip
    lines.append(
        "Fixes: pass split_points=[...] at the boundaries of submodules that contain the untraceable code, so they "
        "run whole inside one module (torch.fx calls units that contain no split point without tracing them); or "
        "make forward() traceable by torch.export (no Python branches on tensor values: use torch.where / "
        "torch.cond); or express the model as an nn.Sequential, which needs no capture. See docs/models.md."
    )
    return "\n".join(lines)


def _returned_object(failures: dict[str, BaseException]) -> str | None:
    """The class of a non-tensor object in the model's output, when that is what stopped the tracers."""
    for exc in failures.values():
        found = re.search(r"Found <class '([\w.]+)'> in output", str(exc))
        if found:
            return found.group(1).rsplit(".", 1)[-1]
    return None


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` (every submodule) in train or eval mode inside the block, as it was after."""
    was = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in was.items():
            m.training = mode


# --------------------------------------------------------------------------- torch.fx


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name.removeprefix("model.")
        return name in self.leaves or super().is_leaf_module(m, module_qualified_name)


class _Flat(nn.Module):
    """``model`` called with the call's tensors as separate arguments, returning its output's leaves."""

    def __init__(self, model: nn.Module, call: Call) -> None:
        super().__init__()
        self.model = model
        self._call = call
        self._out_spec: list[TreeSpec] = []

    def _run(self, tensors: tuple[Any, ...]) -> tuple[Any, ...]:
        args, kwargs = self._call.with_tensors(tensors)
        leaves, spec = tree_flatten(self.model(*args, **kwargs))
        self._out_spec.append(spec)
        return tuple(leaves)


def _flat_class(n: int) -> type[_Flat]:
    names = ", ".join(f"x{i}" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self._run(({names}{',' if n == 1 else ''}))\n", namespace)
    return type(f"_Flat{n}", (_Flat,), {"forward": namespace["forward"]})


def _trace_fx(model: nn.Module, call: Call, leaves: set[str]) -> tuple[fx.GraphModule, TreeSpec, None]:
    flat = _flat_class(len(call.tensors))(model, call)
    graph = _Tracer(leaves).trace(flat)
    _strip_prefix(graph, "model.")  # targets relative to the model, as export's are
    return fx.GraphModule(model, graph), flat._out_spec[-1], None


def _strip_prefix(graph: fx.Graph, prefix: str) -> None:
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and isinstance(node.target, str):
            node.target = node.target.removeprefix(prefix)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (path.removeprefix(prefix) if path != prefix.rstrip(".") else "", kind)
                for k, (path, kind) in stack.items()
            }


# --------------------------------------------------------------------------- torch.export


def _trace_export(model: nn.Module, call: Call, leaves: set[str]) -> tuple[fx.GraphModule, TreeSpec, Any]:
    from torch.export import Dim, export

    def example(v: Any) -> Any:
        return v.detach().contiguous() if isinstance(v, torch.Tensor) else v

    def dims(v: Any) -> Any:
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    args, kwargs = tree_unflatten([example(v) for v in call.leaves], call.spec)
    shapes = tree_unflatten([dims(v) for v in call.leaves], call.spec)
    exported = export(model, args, kwargs, dynamic_shapes=_combined(model, shapes, call), strict=False)
    module = exported.module()
    graph = module.graph
    # Placeholders for every leaf of (args, kwargs): keep the tensors', fold the others' values in.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(call.leaves):
        raise RuntimeError(f"export made {len(placeholders)} inputs for {len(call.leaves)} leaves")
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node, value in zip(placeholders, call.leaves):
        if not isinstance(value, torch.Tensor):
            for user in list(node.users):
                user.replace_input_with(node, value)  # type: ignore[arg-type]
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs, no input-spec check hook
    graph.lint()
    return fx.GraphModule(module, graph), exported.call_spec.out_spec, exported


def _combined(model: nn.Module, shapes: tuple[Any, dict[str, Any]], call: Call) -> Any:
    """``dynamic_shapes`` as export wants it: by parameter name, matching how the inputs bind."""
    signature = signature_of(model)
    args_shapes, kwargs_shapes = shapes
    if signature is None:
        return tuple(args_shapes) + tuple(kwargs_shapes.values())
    bound = signature.bind(*args_shapes, **kwargs_shapes)
    return dict(bound.arguments)
