"""Units: the submodules a model may be cut between, and the exact min-max cut over them.

A unit is a submodule that runs as a whole inside one pipeline module.  The units of
an ``nn.Sequential`` are its children.  For any other model they are found by opening
modules from the root down to the model's *repeated blocks*:

* containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are always opened;
* so is a module that holds *repeated blocks* somewhere below it: a container with two or
  more children of one class, each at least two levels deep and with parameters -- such as
  ``transformer.h`` of GPT-2, ``bert.encoder.layer``, ``model.layers`` of Llama, the blocks
  of a timm ConvNeXt stage or ``encoder.layers`` of torchvision's ViT;
* everything else is a unit (a transformer block, a residual block, an embedding, a head).

So a ResNet's units are its stem layers and residual blocks, a transformer's are its
embeddings, its blocks and its head.  A module object that appears under two names
(a shared embedding) is one unit, under its first name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def candidate_units(model: nn.Module) -> list[str]:
    """Submodule names the automatic balancer may cut at, in definition order."""
    if isinstance(model, nn.Sequential):
        return [name for name, child in model._modules.items() if child is not None]
    units: list[str] = []
    seen: set[int] = set()

    def expand(prefix: str, module: nn.Module) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            qualname = f"{prefix}.{name}" if prefix else name
            if (isinstance(child, CONTAINERS) and len(child) > 0) or _holds_repeated_blocks(child):
                expand(qualname, child)
            else:
                seen.update(id(m) for m in child.modules())
                units.append(qualname)

    expand("", model)
    return units


def _height(module: nn.Module) -> int:
    return 1 + max((_height(c) for c in module.children()), default=-1)


def _holds_repeated_blocks(module: nn.Module) -> bool:
    """A container at or below ``module`` has two or more children of one class, >= 2 levels deep, with parameters."""
    for m in module.modules():
        if isinstance(m, CONTAINERS):
            count: dict[type, int] = {}
            for child in m.children():
                if _height(child) >= 2 and next(child.parameters(), None) is not None:
                    count[type(child)] = count.get(type(child), 0) + 1
            if any(c >= 2 for c in count.values()):
                return True
    return False


def check_names(model: nn.Module, split_points: Sequence[str]) -> None:
    """Every split point names a submodule, once, and none lies inside another."""
    if isinstance(model, nn.Sequential):
        names = [n for n, c in model._modules.items() if c is not None] + [n for n, _ in model.named_modules() if n]
    else:
        names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for point in split_points:
        if point not in names:
            close = difflib.get_close_matches(point, names, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"split point {point!r} is not a submodule name of {type(model).__name__} "
                f"(names as in model.named_modules()){hint}"
            )
    if len(set(split_points)) != len(split_points):
        raise ValueError(f"split_points lists a name twice: {list(split_points)}")
    for a in split_points:
        for b in split_points:
            if b.startswith(a + "."):
                raise ValueError(
                    f"split point {b!r} lies inside split point {a!r}; a split point cannot contain another"
                )


def balanced_starts(weights: Sequence[float], parts: int, allowed: Sequence[bool] | None = None) -> list[int]:
    """Indices at which parts 2..K begin, minimising the heaviest contiguous part (exact DP).

    ``allowed[i]`` False: no part may begin at item i (a unit called more than once).
    """
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    return min_max_cut(len(weights), parts, lambda i, j, last: prefix[j] - prefix[i], allowed)


def min_max_cut(
    n: int, parts: int, cost: Callable[[int, int, bool], float], allowed: Sequence[bool] | None = None
) -> list[int]:
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
                if i > 0 and allowed is not None and not allowed[i]:
                    continue
                c = max(best[p - 1][i], cost(i, j, p == parts))
                if c < best[p][j]:
                    best[p][j], cut[p][j] = c, i
    if best[parts][n] == inf:
        raise ValueError(f"cannot cut {n} units into {parts} modules at units that run once")
    starts, j = [], n
    for p in range(parts, 1, -1):
        j = cut[p][j]
        starts.append(j)
    return starts[::-1]
