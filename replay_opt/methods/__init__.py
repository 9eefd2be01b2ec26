"""Training methods behind one interface; ``method=`` in ``ReplayModelWrapper`` picks one."""

from __future__ import annotations

from ..cut.partition import Stage
from .base import Method
from .bp import Backprop, GPipe, OneFOneB
from .ddg import DelayedGradients
from .dgl import GreedyLocal
from .dni import SyntheticGradients
from .fr import FeaturesReplay

METHODS: dict[str, type[Method]] = {
    "fr": FeaturesReplay,
    "bp": Backprop,
    "gpipe": GPipe,
    "1f1b": OneFOneB,
    "ddg": DelayedGradients,
    "dni": SyntheticGradients,
    "dgl": GreedyLocal,
}


def make_method(name: str, stages: list[Stage]) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method={name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](stages)


__all__ = ["METHODS", "Method", "make_method"]
