"""Cutting a model into stage modules (``replay_opt/cut/split.py``): traced graphs whose stages compose to the
model, values carried across a cut, an ``nn.Sequential`` cut into runs of children, inputs protected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ResNetish, chained, mlp
from torch import nn

from replay_opt import ReplayModelWrapper
from replay_opt.cut.capture import Call, capture, signature_of
from replay_opt.cut.split import split_sequential, units_in_order
from replay_opt.cut.units import candidate_units


@pytest.mark.parametrize(
    "split_points",
    [["layers.1"], ["layers.1", "layers.3"], ["layers.0.conv2", "head"], ["layers.2.bn", "layers.3.conv2"]],
)
def test_traced_stages_compose_to_the_model(split_points):
    model = ResNetish().eval()
    wrapper = ReplayModelWrapper(model, split_points=split_points).eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(chained(wrapper, x), model(x), rtol=0, atol=0)


def test_a_residual_crossing_a_split_point_is_carried():
    wrapper = ReplayModelWrapper(ResNetish(), split_points=["layers.0.conv2"])
    # Module 1 ends inside block 0: it must hand over both the block input (the residual) and the
    # long skip -- which here is the same value -- and the half-computed branch.
    model = wrapper.module.eval()
    x = torch.randn(3, 8)
    out = wrapper.eval().stages[0](x)
    with torch.no_grad():
        h = model.stem(x)
        branch = F.relu(model.layers[0].bn(model.layers[0].conv1(h)))
    assert isinstance(out, tuple) and len(out) == 2
    expected = [h, branch]
    for value in out:  # the carried values are exactly the residual and the branch (in some order)
        assert sum(torch.equal(value, e) for e in expected) == 1
    assert sorted(v.data_ptr() == out[0].data_ptr() for v in out) == [False, True]  # two distinct values


def test_a_sequential_is_cut_into_runs_of_its_children():
    model = mlp(depth=4).eval()
    stages = split_sequential(model, ["2", "6"])
    assert [len(s.body.body) for s in stages] == [2, 4, 1]  # children 0-1, 2-5, 6
    x = torch.randn(3, 8)
    values = (x,)
    for stage in stages:
        values = stage(*values)
    torch.testing.assert_close(values, model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must follow execution order"):
        split_sequential(model, ["6", "2"])
    with pytest.raises(ValueError, match="is the first layer"):
        split_sequential(model, ["0"])


def test_a_unit_that_runs_twice_cannot_begin_a_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.c(self.a(self.b(self.a(x))))  # a runs twice

    model = Shared()
    units = candidate_units(model)
    graph = capture(model, Call(signature_of(model), (torch.randn(2, 4),), {}), True, leaves=set(units))
    called, once = units_in_order(graph, units)
    assert called == ["a", "b", "c"] and once == [False, True, True]


def test_an_in_place_op_after_a_cut_leaves_the_stored_input_intact():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    stages = split_sequential(model, ["1"])
    x = torch.randn(3, 4)
    (h,) = stages[0](x)
    kept = h.clone()
    out = stages[1](h)
    assert torch.equal(h, kept)  # ReLU(inplace=True) ran on a copy
    torch.testing.assert_close(out, model(x))
