"""method="bp" at any K, and method="fr" at K=1, are plain backprop: compared with a plain autograd loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, max_param_diff, mlp

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def plain_autograd(model, data, make_opt):
    opt = make_opt(model.parameters())
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("method", "k"), [("fr", 1), ("bp", 1), ("bp", 2), ("bp", 3), ("bp", 4)])
def test_equals_plain_autograd(method, k):
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(10, last=3)

    def make_opt(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)

    plain_autograd(reference, data, make_opt)
    wrapper = ReplayModelWrapper(model, num_modules=k, method=method)
    opt = ReplayOptimizer(make_opt(wrapper.parameters()), wrapper)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert max_param_diff(model, reference) <= 1e-6


def test_bp_without_replay_optimizer_is_allowed():
    model = mlp()
    reference = copy.deepcopy(model)
    data = batches(3)
    plain_autograd(reference, data, lambda p: torch.optim.SGD(p, lr=0.1))
    wrapper = ReplayModelWrapper(model, num_modules=3, method="bp")
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert max_param_diff(model, reference) <= 1e-6
