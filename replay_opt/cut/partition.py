"""The K stages of a wrapped model, and the captured programs they run.

``Partition`` owns what the wrapper needs to run a model as K modules:

* its *units* (``units.py``) and *split points* -- given, or chosen by the balancer;
* one ``Stage`` per module: an index, a device, and ``stage.train``, the module the training
  methods call (a dispatcher to the program in use);
* *programs*: the K stage modules of one captured call signature (``capture.py``, ``split.py``).
  An ``nn.Sequential`` or K=1 has a single program that needs no capture (K=1 runs the
  model's own ``forward``).  Any other model is captured at construction when torch.fx can
  trace its default call (or ``example_inputs`` are given), otherwise at its first forward;
  a call with another signature (``labels=`` present or not, eval mode) gets a program of its
  own, kept in a small LRU cache.

``bind(args, kwargs)`` makes the ``Call`` of a forward (``capture.py``) -- the one object the wrapper
hands on; ``select(call, training)`` picks (or captures) the program for it, makes it the current
one and sets ``call.inputs``, the values to feed module 1.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .balance import choose_split_points
from .capture import (
    TRACERS,
    Call,
    CaptureError,
    Graph,
    as_call,
    capture,
    example_call,
    signature_of,
    use_cache_position,
    without_cache,
)  # fmt: skip
from .split import StageModule, is_sequential_split, split_graph, split_sequential, units_in_order
from .units import candidate_units, check_names

logger = logging.getLogger(__name__)

Balance = str | Sequence[int]
CACHE_SIZE = 8


@dataclass
class Program:
    """The K stage modules for one call signature (``key`` None: the model's only program)."""

    key: Hashable
    stages: list[StageModule]
    graph: Graph | None = None
    name: str = "default"

    def fits(self, call: Call) -> bool:
        return self.graph is None or self.graph.fits(call)


class WholeCall:
    """The unchanged ``(args, kwargs)`` of a call, for K=1: module 1 is the model itself."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


class _Whole(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, call: WholeCall) -> Any:
        return self.model(*call.args, **call.kwargs)


class StageDispatch(nn.Module):
    """``stage.train``: runs this index's module of the current program.

    Every program's module for this index is registered here (they share the model's
    layers), so ``parameters()``, ``buffers()``, ``.to()`` and ``modules()`` see them all.
    """

    def __init__(self, index: int, partition: Partition) -> None:
        super().__init__()
        self.index = index
        self.programs = nn.ModuleList()
        self.partition = partition  # (not a module: a plain attribute)

    def current_module(self) -> StageModule:
        """This index's module of the program in use."""
        return self.partition.current_program().stages[self.index]

    def forward(self, *inputs: Any) -> Any:
        module = self.current_module()
        checkpointing = self.partition.checkpointing
        if checkpointing is None or not torch.is_grad_enabled() or not checkpointing.covers(self.index):
            return module(*inputs)
        return checkpointing(module, inputs)


@dataclass
class Checkpointing:
    """Activation checkpointing per pipeline module: a module's forward that builds a graph keeps only its inputs;
    backward runs it again (``torch.utils.checkpoint``, non-reentrant, with the same random draws) and puts its
    buffers back as they were, so BatchNorm's running statistics count each batch once."""

    every: int
    options: dict[str, Any] = field(default_factory=dict)

    def covers(self, index: int) -> bool:
        return index % self.every == 0

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> Any:
        # How the forward ran -- BatchNorm tracking its statistics or not (a replay does not), a captured graph's
        # frozen variant or not -- so that the recomputation runs alike and saves the same tensors.
        modes = [(m, a, getattr(m, a)) for m in module.modules() for a in _MODES if hasattr(m, a)]
        ran = []

        def run(*values: Any) -> Any:
            if not ran:  # the forward
                ran.append(True)
                return module(*values)
            buffers = [(b, b.detach().clone()) for b in module.buffers()]  # backward's recomputation
            now = [(m, a, getattr(m, a)) for m, a, _ in modes]
            try:
                for m, a, value in modes:
                    setattr(m, a, value)
                return module(*values)
            finally:
                for m, a, value in now:
                    setattr(m, a, value)
                with torch.no_grad():
                    for b, kept in buffers:
                        b.copy_(kept)

        return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False, **self.options)


_MODES = ("track_running_stats", "_freeze")  # BatchNorm's, and a stage module's frozen_running_stats() flag


@dataclass
class Stage:
    """One module of the pipeline: the dispatcher the methods call, and its device."""

    index: int
    train: StageDispatch
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.train.parameters())

    def forward(self, training: bool, *inputs: Any) -> Any:  # the program in use was selected with the mode
        return self.train(*inputs)

    @property
    def program(self) -> Program | None:
        return self.train.partition.current

    def using(self, program: Program | None) -> contextlib.AbstractContextManager[None]:
        return self.train.partition.using(program)


class Partition:
    def __init__(
        self,
        model: nn.Module,
        *,
        num_modules: int | None,
        split_points: Sequence[str] | None,
        balance: Balance = "params",
        example_inputs: Any = None,
        capture: str = "auto",
    ) -> None:
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
        if not isinstance(num_modules, int) or isinstance(num_modules, bool) or num_modules < 1:
            raise ValueError(f"num_modules must be a positive integer, got {num_modules!r}")
        if capture not in TRACERS:
            raise ValueError(f"capture must be one of {TRACERS}, got {capture!r}")
        _check_balance(balance, num_modules)
        self.model = model
        self.num_modules = num_modules
        self.balance = balance
        self.tracer = capture
        self.units = candidate_units(model)
        self.split_points: list[str] | None = split_points
        self.ordered_units: list[str] | None = None  # units in execution order, once captured
        self.stages = [Stage(i, StageDispatch(i, self)) for i in range(num_modules)]
        self.signature = signature_of(model)
        self.current: Program | None = None
        self.on_new_program: Callable[[Program], None] | None = None  # placement, set by the wrapper
        self._cache: OrderedDict[Hashable, Program] = OrderedDict()
        self._fixed: Program | None = None  # the one program of a Sequential / K=1
        self._example = example_inputs
        self._warned_cache = False
        self._use_cache_at = use_cache_position(self.signature, model)  # found once, not per forward
        self.checkpointing: Checkpointing | None = None
        if split_points is not None:
            check_names(model, split_points)
        elif num_modules > len(self.units):
            raise ValueError(
                f"num_modules={num_modules} but {type(model).__name__} has only {len(self.units)} splittable units "
                f"({', '.join(self.units)}); use num_modules <= {len(self.units)} or pass split_points inside "
                "these units"
            )
        if num_modules == 1:
            self.split_points = []
            self._install(Program(None, [StageModule(_Whole(model), last=True)], name="whole model"))
        elif is_sequential_split(model, split_points or self.units):
            if self.split_points is None:
                self.split_points = self._choose(self.units, [True] * len(self.units))
            self._install(Program(None, split_sequential(model, self.split_points), name="nn.Sequential"))
        elif example_inputs is not None:
            self.select(self.bind(*as_call(example_inputs)), training=True)
        elif capture in ("auto", "fx") and balance != "time":
            self._capture_default_call()
        if balance == "time" and self.split_points is None and example_inputs is None:
            raise ValueError(
                'balance="time" profiles each unit and needs example_inputs=(x,) with a batch like the '
                'training batches; pass it, or use the default balance="params"'
            )

    def checkpoint(self, every: int, **options: Any) -> None:
        """Checkpoint modules 1, 1+every, 1+2*every, ... (``every=0``: none); ``options`` for
        ``torch.utils.checkpoint.checkpoint``."""
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"every_n_layers must be a positive integer, got {every!r}")
        options.pop("use_reentrant", None)  # reentrant checkpointing needs inputs that require grad; same result
        unknown = set(options) - {"preserve_rng_state", "determinism_check", "debug", "context_fn"}
        if unknown:
            raise ValueError(
                f"unknown checkpointing options {sorted(unknown)}; torch.utils.checkpoint takes preserve_rng_state, "
                "determinism_check, debug, context_fn"
            )
        self.checkpointing = None if every == 0 else Checkpointing(every, options)

    # ----------------------------------------------------------------------- programs

    @property
    def captured(self) -> bool:
        return self._fixed is not None or bool(self._cache)

    def programs(self) -> list[Program]:
        return [self._fixed] if self._fixed is not None else list(self._cache.values())

    def current_program(self) -> Program:
        if self.current is None:  # a stage called directly, before the wrapper: the latest capture
            programs = self.programs()
            if not programs:
                raise RuntimeError(
                    f"{type(self.model).__name__} is captured at its first forward: call the wrapper before its stages"
                )
            self.current = programs[-1]
        return self.current

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """The ``Call`` of ``model(*args, **kwargs)`` through the cut: ``use_cache=False`` where ``forward`` takes
        ``use_cache`` (transformers models) -- a cache is not a tensor that can cross a cut, and training or
        evaluating through the cut never reads it.  A model with one fixed program (an ``nn.Sequential``, K=1)
        takes its arguments as given."""
        kwargs = self._without_cache(args, kwargs)
        return Call(None if self._fixed is not None else self.signature, args, kwargs)

    def select(self, call: Call, training: bool) -> Call:
        """Make the program for this call current (capturing it if new); set ``call.inputs``, module 1's inputs."""
        if self._fixed is not None:
            self.current = self._fixed
            args, kwargs = call.args, call.kwargs
            if self.num_modules == 1:
                call.inputs = (WholeCall(args, kwargs),)
            elif kwargs:
                raise TypeError(f"{type(self.model).__name__} takes positional inputs only; got {sorted(kwargs)}")
            else:
                call.inputs = args
            return call
        key = call.key(training)
        program = self._cache.get(key)
        if program is not None and program.fits(call):
            self._cache.move_to_end(key)
        else:
            program = self._capture(call, training, key)
        self.current = program
        call.inputs = call.tensors
        return call

    def _without_cache(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        off = without_cache(self._use_cache_at, args, kwargs)
        if off is not kwargs and kwargs.get("use_cache") and not self._warned_cache:
            logger.warning(
                "use_cache=True ignored: a ReplayModelWrapper runs the model through its cut without a cache"
            )
            self._warned_cache = True
        return off

    @contextlib.contextmanager
    def using(self, program: Program | None) -> Iterator[None]:
        """Run the body with ``program`` current (a replay of an input stored under it)."""
        if program is None or program is self.current:
            yield
            return
        previous, self.current = self.current, program
        try:
            yield
        finally:
            self.current = previous

    def _capture(self, call: Call, training: bool, key: Hashable, graph: Graph | None = None) -> Program:
        graph = graph or capture(self.model, call, training, leaves=self._leaves(), tracer=self.tracer)
        if self.split_points is None or self.ordered_units is None:
            ordered, allowed = self._units_in_order(graph)
            if self.split_points is None:
                self.split_points = self._choose(ordered, allowed, graph=graph, call=call)
            self.ordered_units = ordered
        stages = split_graph(graph, self.model, self.split_points)
        mode = "train" if training else "eval"
        program = Program(key, stages, graph, name=f"{mode}: {call.describe()}")
        if key in self._cache:  # the same signature with other shapes: replace
            self._forget(self._cache.pop(key))
        self._cache[key] = program
        while len(self._cache) > CACHE_SIZE:
            self._forget(self._cache.popitem(last=False)[1])
        self._install(program)
        if len(self._cache) == CACHE_SIZE:
            logger.warning(
                "%s has been captured for %d call signatures; each new one costs a capture. Keep the "
                "arguments' presence, dtypes and flags the same from call to call.",
                type(self.model).__name__,
                CACHE_SIZE,
            )
        return program

    def _install(self, program: Program) -> None:
        if program.key is None:
            self._fixed = program
        for stage, module in zip(self.stages, program.stages):
            stage.train.programs.append(module)
        if self.on_new_program is not None:
            self.on_new_program(program)

    def _forget(self, program: Program) -> None:
        for stage, module in zip(self.stages, program.stages):
            kept = [m for m in stage.train.programs if m is not module]
            stage.train.programs = nn.ModuleList(kept)

    def _choose(self, units: list[str], allowed: list[bool], graph: Graph | None = None, call: Call | None = None
                ) -> list[str]:  # fmt: skip
        """Split points for ``self.balance`` (``balance="time"`` profiles on the call, or the example inputs)."""
        if self.balance == "time" and call is None:
            call = example_call(self.signature, self._example)
        return choose_split_points(self.model, self.num_modules, self.balance, units, allowed, graph=graph, call=call)

    def _leaves(self) -> set[str]:
        """Units fx may call whole: those that hold no split point."""
        points = self.split_points or []
        return {u for u in self.units if not any(p == u or p.startswith(u + ".") for p in points)} | set(points)

    def _units_in_order(self, graph: Graph) -> tuple[list[str], list[bool]]:
        """The units the call runs, in execution order, and whether each runs once (may begin a module)."""
        called, once = units_in_order(graph, self.units)
        if len(called) < self.num_modules:
            raise ValueError(
                f"num_modules={self.num_modules} but this call of {type(self.model).__name__} runs only "
                f"{len(called)} units ({', '.join(called)}); use fewer modules or pass split_points"
            )
        return called, once

    def _capture_default_call(self) -> None:
        """Trace now with torch.fx when the model can be called with tensors for its required arguments
        and defaults for the rest; models fx cannot trace are captured at their first forward."""
        if self.signature is None:
            return
        args = []
        for p in self.signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY) or p.default is not p.empty:
                break
            args.append(torch.empty(0))
        call = Call(self.signature, tuple(args), {})
        try:
            graph = capture(self.model, call, True, leaves=self._leaves(), tracer="fx")
        except CaptureError as exc:  # not traceable by fx (or not called this way): at the first forward
            logger.info("%s will be captured at its first forward (%s)", type(self.model).__name__, exc)
            if self.tracer == "fx":
                raise
            return
        program = self._capture(call, True, call.key(True), graph)
        names = [p.name for p in self.signature.parameters.values()][: len(args)]
        program.name = f"train: {', '.join(names)} (at construction)"


def _check_balance(balance: Balance, num_modules: int) -> None:
    if isinstance(balance, str):
        if balance not in ("params", "time"):
            raise ValueError(f'balance must be "params", "time" or a list of unit counts, got {balance!r}')
    elif len(balance) != num_modules or any(not isinstance(c, int) or c < 1 for c in balance):
        raise ValueError(f"balance={list(balance)!r} must list {num_modules} positive unit counts")
