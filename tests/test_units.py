"""The units a model may be cut between (``replay_opt/cut/units.py``): which they are, names checked, and the
exact min-max cut against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ResNetish, mlp
from torch import nn

from replay_opt.cut.units import balanced_starts, candidate_units, check_names, min_max_cut


def test_balanced_starts_is_optimal():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(3, 9, (1,), generator=g))
        k = int(torch.randint(1, min(n, 4) + 1, (1,), generator=g))
        w = torch.randint(0, 10, (n,), generator=g).tolist()

        def heaviest(starts):
            bounds = [0, *starts, n]
            return max(sum(w[bounds[i] : bounds[i + 1]]) for i in range(k))

        best = min(heaviest(list(c)) for c in itertools.combinations(range(1, n), k - 1))
        starts = balanced_starts(w, k)
        assert len(starts) == k - 1 and starts == sorted(set(starts)) and all(0 < s < n for s in starts)
        assert heaviest(starts) == best


def test_min_max_cut_is_optimal_for_any_cost_and_respects_allowed_starts():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = int(torch.randint(3, 8, (1,), generator=g))
        k = int(torch.randint(2, min(n, 4) + 1, (1,), generator=g))
        w = torch.rand(n, generator=g).tolist()
        allowed = [True] + [bool(b) for b in (torch.rand(n - 1, generator=g) > 0.3)]

        def cost(i, j, last):  # not additive: a fixed price per part but the last, and a quadratic term
            return sum(w[i:j]) ** 2 + (0.0 if last else 0.25)

        def worst(starts):
            bounds = [0, *starts, n]
            return max(cost(bounds[i], bounds[i + 1], i == k - 1) for i in range(k))

        options = [c for c in itertools.combinations(range(1, n), k - 1) if all(allowed[s] for s in c)]
        if not options:
            with pytest.raises(ValueError, match="cannot cut"):
                min_max_cut(n, k, cost, allowed)
            continue
        starts = min_max_cut(n, k, cost, allowed)
        assert all(allowed[s] for s in starts)
        assert worst(starts) == pytest.approx(min(worst(list(c)) for c in options))


def test_units_are_a_sequentials_children_and_a_models_repeated_blocks():
    assert candidate_units(mlp(depth=3)) == [str(i) for i in range(5)]
    assert candidate_units(ResNetish(blocks=3)) == ["stem", "layers.0", "layers.1", "layers.2", "head"]

    class Layer(nn.Module):  # two levels deep (it holds modules that hold layers), as a transformer block
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    class Tower(nn.Module):  # a transformer's shape: embedding, a ModuleList of blocks inside a wrapper, a head
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Module()
            self.body.blocks = nn.ModuleList(Layer() for _ in range(3))
            self.head = nn.Linear(8, 10)
            self.tied = self.embed  # the same module under a second name: one unit

    assert candidate_units(Tower()) == ["embed", "body.blocks.0", "body.blocks.1", "body.blocks.2", "head"]


@pytest.mark.parametrize(
    ("points", "message"),
    [(["layers.9"], "not a submodule name of ResNetish.*did you mean 'layers.3'"),
     (["head", "head"], "lists a name twice"), (["layers", "layers.1"], "lies inside split point 'layers'")],
)  # fmt: skip
def test_bad_split_point_names_name_the_fix(points, message):
    with pytest.raises(ValueError, match=message):
        check_names(ResNetish(), points)
