"""Splitting: nn.Sequential, traced models with skip connections, balancing, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ResNetish, chained, mlp
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def test_training_a_traced_model_matches_autograd():
    """Backprop through the three traced stages (skip connections crossing the cuts, BatchNorm) gives exactly
    the gradients of autograd on the model itself, step after step."""
    torch.manual_seed(0)
    model = ResNetish()
    reference = copy.deepcopy(model)
    wrapper = ReplayModelWrapper(model, num_modules=3, method="bp")
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9), wrapper)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        F.cross_entropy(reference(x), y).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):  # BatchNorm statistics too
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_torchvision_resnet_splits_and_trains():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    wrapper = ReplayModelWrapper(model, split_points=["layer2", "layer3.1.conv1", "layer4"])
    wrapper.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(chained(wrapper, x), model(x), rtol=0, atol=0)
    wrapper.train()
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):  # module 1 of 4 first updates at the fourth step
        loss = F.cross_entropy(wrapper(x), torch.tensor([1, 2]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged  # every module trained: the cut inside layer3's block 1 carried its residual


def test_eval_mode_uses_an_eval_graph():
    """fx bakes `self.training` into a traced graph; eval mode must not run the train graph."""

    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(F.dropout(self.a(x), 0.9, self.training))

    model = FunctionalDropout()
    wrapper = ReplayModelWrapper(model, split_points=["b"], devices=["cpu", "cpu"]).eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(wrapper(x), model.eval()(x))


def test_balance_by_params_list_and_time():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(8, 8))
    assert ReplayModelWrapper(model, num_modules=2).split_points == ["2"]
    assert ReplayModelWrapper(model, num_modules=2, balance=[1, 3]).split_points == ["1"]
    timed = ReplayModelWrapper(model, num_modules=2, balance="time", example_inputs=(torch.randn(32, 8),))
    assert len(timed.split_points) == 1
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no trace


ERRORS = [
    (dict(num_modules=7), "only 6 splittable units"),
    (dict(split_points=["layers.9"]), r"not a submodule name.*did you mean"),
    (dict(split_points=["layers.1"], num_modules=3), "disagrees with 1 split points"),
    (dict(split_points=["layers.1", "layers.0"]), "execution order"),
    (dict(split_points=["layers", "layers.1"]), "lies inside split point"),
    (dict(split_points=["stem"]), "module 1 would be empty"),
    (dict(), "pass num_modules=K"),
    (dict(num_modules=2, balance="flops"), 'balance must be "params", "time"'),
    (dict(num_modules=2, balance="time"), "needs example_inputs"),
    (dict(num_modules=2, balance=[5, 5]), "must list 2 positive unit counts summing to 6"),
    (dict(num_modules=2, devices=["cpu"]), "one per module"),
    (dict(num_modules=2, method="sgd"), "unknown method"),
]


@pytest.mark.parametrize(("kwargs", "message"), ERRORS)
def test_bad_input_names_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReplayModelWrapper(ResNetish(), **kwargs)


def test_split_point_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(self.b(x)))

    with pytest.raises(ValueError, match="called 2 times"):
        ReplayModelWrapper(Twice(), split_points=["b"])


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="list of names"):
        ReplayModelWrapper(mlp(), split_points="2")
    with pytest.raises(TypeError, match="nn.Module"):
        ReplayModelWrapper(lambda x: x, num_modules=2)
    with pytest.raises(TypeError, match="ReplayModelWrapper"):
        ReplayOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1), mlp())
    wrapper = ReplayModelWrapper(mlp(), num_modules=2)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        ReplayOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1), wrapper)
