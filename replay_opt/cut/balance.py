"""Choosing the split points: K contiguous runs of units, the heaviest as light as possible.

Weights per unit are parameter counts (``balance="params"``, no data needed) or the forward +
backward time measured on a batch (``balance="time"``: ``profile``, which the planner uses
too); ``balance=[n1, ..., nK]`` gives the unit counts directly.  Units run in execution order,
and a unit that runs more than once (a shared embedding) cannot begin a module.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from .capture import (
    Call,
    Graph,
    as_call,
    capture,
    signature_of,
    training_mode,
    use_cache_position,
    without_cache,
)  # fmt: skip
from .split import is_sequential_split, split_graph, split_sequential, units_in_order
from .units import balanced_starts, candidate_units


@dataclass
class UnitProfile:
    name: str
    forward_s: float
    backward_s: float
    output_bytes: int  # what crosses a cut placed right after this unit
    params: int
    tied: tuple[int, ...] = ()  # the other units that share a parameter with this one (a tied embedding)
    tied_params: int = 0  # how many of this unit's parameter elements those units share
    # The backward split as the zero-bubble schedules run it (``profile(split_backward=True)``): the pass to the
    # input's gradient, then the pass to the weights' (None: not measured).
    input_backward_s: float | None = None
    weight_backward_s: float | None = None


def choose_split_points(
    model: nn.Module,
    k: int,
    balance: str | Sequence[int],
    units: list[str],
    allowed: list[bool],
    *,
    graph: Graph | None = None,
    call: Call | None = None,
) -> list[str]:
    """The names at which modules 2..K of ``model`` begin, among ``units`` (those ``allowed`` to begin one):
    equal parameter counts (``"params"``), equal time measured on ``call`` (``"time"``), or unit counts."""
    if isinstance(balance, str):
        if balance == "params":
            seen: set[int] = set()
            weights = []
            for u in units:
                params = [p for p in model.get_submodule(u).parameters() if id(p) not in seen]
                seen.update(id(p) for p in params)
                weights.append(float(sum(p.numel() for p in params)))
        else:
            assert call is not None, 'balance="time" profiles on a call'
            profiled = {u.name: u for u in profile(model, call, units=units, allowed=allowed, graph=graph)}
            weights = [profiled[u].forward_s + profiled[u].backward_s if u in profiled else 0.0 for u in units]
        starts = balanced_starts(weights, k, allowed)
    else:
        counts = list(balance)
        if sum(counts) != len(units):
            raise ValueError(
                f"balance={counts!r} must list {k} positive unit counts summing to {len(units)} "
                f"(the model's units: {', '.join(units)})"
            )
        starts = [sum(counts[:i]) for i in range(1, k)]
        bad = [units[s] for s in starts if not allowed[s]]
        if bad:
            raise ValueError(
                f"balance={counts!r} begins a module at {bad}, which runs more than once; shift the counts"
            )
    return [units[i] for i in starts]


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """Wait for ``device``'s queued work (a no-op on the CPU), so that a timer reads finished work."""
    device = torch.device(device)
    if device.type == "cpu":
        return lambda: None
    return lambda: torch.get_device_module(device.type).synchronize(device)


def timing_call(model: nn.Module, example_inputs: Any) -> Call:
    """``example_inputs`` (a tuple of positional inputs, a dict of keyword inputs, or a ``Call``) as the call the
    timings run: with ``use_cache=False`` where ``forward`` takes it (a cache cannot cross a cut, and timing never
    reads it)."""
    if isinstance(example_inputs, Call):
        return example_inputs
    signature = signature_of(model)
    args, kwargs = as_call(example_inputs)
    return Call(signature, args, without_cache(use_cache_position(signature, model), args, kwargs))


def _with_grad(out: Any) -> list[torch.Tensor]:
    """The tensors of ``out`` that a backward pass starts from."""
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


@contextlib.contextmanager
def left_as_it_was(model: nn.Module) -> Iterator[None]:
    """Time ``model`` inside the block in training mode; after it, the weights, buffers, gradients, mode and
    RNG are as they were."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    try:
        with training_mode(model, True), torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g


def profile(
    model: nn.Module,
    example_inputs: Any,
    repeats: int = 3,
    *,
    units: list[str] | None = None,
    allowed: list[bool] | None = None,
    graph: Graph | None = None,
    split_backward: bool = False,
) -> list[UnitProfile]:
    """Time each unit's forward and backward on the model's device; leaves the model as it was.

    ``example_inputs``: a tuple of positional inputs, a dict of keyword inputs, or a ``Call``.
    Units that cannot begin a module are timed together with the unit before them.
    ``split_backward``: also time the backward split in two as torch.distributed.pipelining's zero-bubble
    schedules run it (input gradients, then weight gradients: ``input_backward_s``, ``weight_backward_s``).
    """
    call = timing_call(model, example_inputs)
    if units is None:
        units = candidate_units(model)
        if not isinstance(model, nn.Sequential):
            graph = graph or capture(model, call, True, leaves=set(units))
            units, allowed = units_in_order(graph, units)
    allowed = allowed or [True] * len(units)
    starts = [u for u, ok in zip(units[1:], allowed[1:]) if ok]
    if is_sequential_split(model, starts):
        stages = split_sequential(model, starts)
    else:
        graph = graph or capture(model, call, True, leaves=set(units))
        stages = split_graph(graph, model, starts)
    heads = [units[0], *starts]
    sync = synchronizer(next(model.parameters()).device)
    out_profiles = []
    owners: dict[int, set[int]] = {}  # parameter id -> the units using it
    with left_as_it_was(model):
        x: tuple[Any, ...] = call.tensors
        for name, stage in tqdm(list(zip(heads, stages)), desc="timing units (balance='time')", leave=False):
            inputs = tuple(
                v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for v in x
            )
            fwd, bwd = [], []
            for r in range(repeats + 1):  # the first run warms up
                sync()
                t0 = time.perf_counter()
                out = stage(*inputs)
                sync()
                t1 = time.perf_counter()
                values = tree_flatten(out)[0]
                tensors = _with_grad(values)
                if tensors:
                    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                sync()
                t2 = time.perf_counter()
                if r:
                    fwd.append(t1 - t0)
                    bwd.append(t2 - t1)
            crossing = sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))
            params = sum(p.numel() for p in stage.parameters())
            for p in stage.parameters():
                owners.setdefault(id(p), set()).add(len(out_profiles))
            unit = UnitProfile(name, min(fwd), min(bwd), crossing, params)
            if split_backward:
                unit.input_backward_s, unit.weight_backward_s = _split_backward_s(stage, inputs, repeats, sync)
            out_profiles.append(unit)
            x = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in values)
    numel = {id(p): p.numel() for p in model.parameters()}
    for i, u in enumerate(out_profiles):
        shared = [pid for pid, users in owners.items() if i in users and len(users) > 1]
        u.tied = tuple(sorted({j for pid in shared for j in owners[pid]} - {i}))
        u.tied_params = sum(numel.get(pid, 0) for pid in shared)
    return out_profiles


def _split_backward_s(stage: nn.Module, inputs: tuple[Any, ...], repeats: int, sync: Any) -> tuple[float, float]:
    """The input-gradient pass and the weight-gradient pass of ``stage``'s backward, timed apart with the functions
    torch.distributed.pipelining's zero-bubble schedules call (the first unit, whose input takes no gradient,
    has only the weight pass)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    wired = [v for v in inputs if isinstance(v, torch.Tensor) and v.requires_grad]
    times_in, times_w = [], []
    for r in range(repeats + 1):
        # (the input pass detaches the outputs in place, which a view refuses)
        tensors = [t.clone() if t._is_view() else t for t in _with_grad(stage(*inputs))]
        if not tensors:
            return 0.0, 0.0
        grads = [torch.ones_like(t) for t in tensors]
        sync()
        t0 = time.perf_counter()
        if wired:
            _, groups = stage_backward_input(tensors, grads, wired, iter(stage.parameters()))
            sync()
            t1 = time.perf_counter()
            stage_backward_weight(iter(stage.parameters()), groups)
        else:
            t1 = t0
            torch.autograd.backward(tensors, grads)
        sync()
        t2 = time.perf_counter()
        for v in wired:
            v.grad = None
        if r:
            times_in.append(t1 - t0)
            times_w.append(t2 - t1)
    return min(times_in), min(times_w)


def step_seconds(model: nn.Module, examples: Mapping[Hashable, Any], repeats: int = 5) -> dict[Hashable, float]:
    """The whole model's forward + backward on each of ``examples`` (batches, as ``profile`` takes them), timed
    end to end: the median of ``repeats`` rounds, the batches taking turns in each round so that a slow spell of
    the machine hits them alike.  Leaves the model as it was."""
    calls = {key: timing_call(model, example) for key, example in examples.items()}
    sync = synchronizer(next(model.parameters()).device)
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    with left_as_it_was(model):
        for r in range(repeats + 1):  # the first round warms up
            for key, call in calls.items():
                sync()
                start = time.perf_counter()
                tensors = _with_grad(model(*call.args, **call.kwargs))
                torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                sync()
                if r:
                    times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}
