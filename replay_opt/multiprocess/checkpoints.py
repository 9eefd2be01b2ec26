"""Collective state dicts with one process per module: each module's state from the rank that trains it.

Every rank calls them together, as ``accelerator.save_state`` does: the model's comes from replica
0's owners of each module, the optimizer's inner state likewise, and the replay state of every
rank (stored inputs, stale gradients, counters) is kept, by rank, so a resumed run continues
identically with the same layout.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .placeholders import named_tensors
from .wire import Op

Rank = Any  # the ``Rank`` of ``rank.py``


def model_state_dict(rank: Rank, full: dict[str, torch.Tensor], local_keys: set[str]) -> dict[str, torch.Tensor]:
    """``full`` (this process's copy of the whole model) with every module's entries from the rank that trains it."""
    rank.sync(Op.STATE)
    own = {k: v.detach().cpu() for k, v in full.items() if k in local_keys} if rank.layout.replica == 0 else {}
    merged = dict(full)
    for part in rank.transport.gather_objects(own):
        for key, value in part.items():
            merged[key] = value.to(full[key].device) if isinstance(full[key], torch.Tensor) else value
    return merged


def optimizer_state_dict(
    rank: Rank, inner: dict[str, Any], local: set[int], replay: Callable[[], Any]
) -> dict[str, Any]:
    """Collect every rank's part (``replay`` is called after the sync, with any in-flight gradient kept)."""
    rank.sync(Op.STATE)
    layout = rank.layout
    own = {i: _to_cpu(st) for i, st in inner["state"].items() if i in local} if layout.replica == 0 else {}
    mine = {"rank_state": _to_cpu(replay()), **rank.counters()}
    parts = rank.transport.gather_objects((own, mine))
    state: dict[int, Any] = {}
    for own_part, _ in parts:
        state.update(own_part)
    return {
        "state": state,
        "param_groups": inner["param_groups"],
        "replay": {"world_size": layout.world_size, "num_modules": layout.num_modules, "ranks": [p[1] for p in parts]},
    }


def load_replay(rank: Rank, replay: dict[str, Any]) -> dict[str, Any]:
    """This rank's replay state from a pipeline checkpoint (same layout required); its counters restored."""
    layout = rank.layout
    if replay.get("world_size") != layout.world_size or replay.get("num_modules") != layout.num_modules:
        raise ValueError(
            f"checkpoint was written by {replay.get('world_size')} ranks with num_modules="
            f"{replay.get('num_modules')}; resume with the same number of processes and modules "
            f"(now {layout.world_size} and {layout.num_modules})"
        )
    mine = replay["ranks"][layout.rank]
    rank.restore_counters(mine)
    return mine["rank_state"]


class FreshStateDict:
    """State-dict hook of the wrapped model with one process per module: the entries of every module come
    from the rank that trains it (collective: every rank must ask together)."""

    def __init__(self, rank: Rank) -> None:
        self.rank = weakref.ref(rank)

    def __call__(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        rank = self.rank()
        if rank is None or rank.closed:
            return
        own = {id(t) for t in [*rank.stage.parameters(), *rank.stage.train.buffers()]}
        named = named_tensors(module)
        local_keys = {prefix + name for name, t in named if id(t) in own}
        state_dict.update(model_state_dict(rank, state_dict, local_keys))
        # Tied weights stay one tensor under all their names, as in one process (save_pretrained and
        # safetensors then store them once); every owner holds the same value.
        first: dict[int, str] = {}
        for name, t in named:
            key = first.setdefault(id(t), prefix + name)
            if prefix + name in state_dict and key in state_dict:
                state_dict[prefix + name] = state_dict[key]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
