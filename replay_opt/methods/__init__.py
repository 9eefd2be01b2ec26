"""Training methods behind one interface; ``method=`` in ``ReplayModelWrapper`` picks one."""

from __future__ import annotations

from ..partition import Stage
from .base import Method
from .bp import Backprop
from .fr import FeaturesReplay

METHODS: dict[str, type[Method]] = {"fr": FeaturesReplay, "bp": Backprop}
PLANNED = ("ddg", "dni", "dgl")


def make_method(name: str, stages: list[Stage]) -> Method:
    if name in PLANNED:
        raise ValueError(
            f"method={name!r} is not yet available in this version of replay_opt; use one of {sorted(METHODS)}"
        )
    if name not in METHODS:
        raise ValueError(f"unknown method={name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](stages)


__all__ = ["METHODS", "Method", "make_method"]
