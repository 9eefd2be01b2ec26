"""``ChainedOptimizer``: several optimizers stepped as one, e.g. Muon for the hidden matrices and AdamW for the rest.

``torch.optim.Muon`` takes 2-D parameters only, so LM users run it beside an AdamW that holds the
embeddings, norms, biases and head.  ``ReplayOptimizer([muon, adamw], model)`` chains them here: one
``Optimizer`` whose parameter groups are the optimizers' groups in order, whose state is theirs, and
whose state dict has torch's usual layout (``state`` by position, ``param_groups`` with positions),
so LR schedulers, ``accelerator.prepare``, ``save_state`` and per-module checkpoints treat it as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch


class ChainedOptimizer(torch.optim.Optimizer):
    """Step, zero and checkpoint several ``torch.optim.Optimizer``s together (no parameter in two of them)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        # No super().__init__: the groups, state and defaults are the chained optimizers'.
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("ReplayOptimizer got an empty list of optimizers; pass one optimizer or several")
        seen: dict[int, int] = {}
        for n, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer {n} of the list is a {type(opt).__name__}, not a torch.optim.Optimizer")
            for group in opt.param_groups:
                for p in group["params"]:
                    if seen.setdefault(id(p), n) != n:
                        raise ValueError(
                            f"a parameter of shape {tuple(p.shape)} is in optimizers {seen[id(p)]} and {n}; give "
                            "each parameter to one optimizer (e.g. Muon the 2-D hidden weights, AdamW the rest)"
                        )
        self.optimizers = optimizers
        self._states = _States(self)
        self._owners: tuple[int, dict[int, torch.optim.Optimizer]] | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers for group in opt.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if [id(g) for g in groups] != [id(g) for g in self.param_groups]:
            raise ValueError("the parameter groups of chained optimizers cannot be replaced; change them in place")

    @property
    def state(self) -> MutableMapping[torch.Tensor, Any]:  # type: ignore[override]
        return self._states

    @state.setter
    def state(self, state: Any) -> None:
        raise AttributeError("the state of chained optimizers is each optimizer's own; load_state_dict() restores it")

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizers[0].defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("add the parameter group to one of the chained optimizers (which one is ambiguous here)")

    def owner(self, p: torch.Tensor) -> torch.optim.Optimizer | None:
        """The chained optimizer that holds ``p`` (None: none does)."""
        count = sum(len(g["params"]) for g in self.param_groups)
        if self._owners is None or self._owners[0] != count:  # (groups only grow: a count tells a change)
            self._owners = (
                count,
                {id(q): opt for opt in self.optimizers for g in opt.param_groups for q in g["params"]},
            )
        return self._owners[1].get(id(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's layout over all groups in order: positions run on from one optimizer to the next."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            own = opt.state_dict()
            state.update({offset + i: s for i, s in own["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups)} parameter groups, these chained optimizers "
                f"{len(self.param_groups)}: resume with the same optimizers, in the same order"
            )
        start, offset = 0, 0
        for opt in self.optimizers:
            mine = groups[start : start + len(opt.param_groups)]
            count = sum(len(g["params"]) for g in opt.param_groups)
            positions = {i for g in mine for i in g["params"]}
            opt.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if i in positions},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
            })  # fmt: skip
            start, offset = start + len(opt.param_groups), offset + count

    def __repr__(self) -> str:
        return "ChainedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


class _States(MutableMapping):
    """The chained optimizers' per-parameter states seen as one mapping (each entry lives with its owner)."""

    def __init__(self, chain: ChainedOptimizer) -> None:
        self.chain = chain

    def _owner(self, p: Any) -> torch.optim.Optimizer:
        owner = self.chain.owner(p)
        if owner is None:
            raise KeyError(p)
        return owner

    def __getitem__(self, p: Any) -> Any:
        owner = self._owner(p)
        if p not in owner.state:  # (a mapping: no entry is made by looking)
            raise KeyError(p)
        return owner.state[p]

    def __setitem__(self, p: Any, value: Any) -> None:
        self._owner(p).state[p] = value

    def __delitem__(self, p: Any) -> None:
        del self._owner(p).state[p]

    def __contains__(self, p: object) -> bool:
        owner = self.chain.owner(p)  # type: ignore[arg-type]
        return owner is not None and p in owner.state

    def __iter__(self) -> Iterator[Any]:
        for opt in self.chain.optimizers:
            yield from list(opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self.chain.optimizers)
