"""Splitting: nn.Sequential, traced models with skip connections, balancing, and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.cut.units import balanced_starts


class Block(nn.Module):
    """A residual block whose skip connection lives inside forward()."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.conv2 = nn.Linear(width, width)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


class ResNetish(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 4):
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.layers = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.stem(x)
        skip = h  # a long skip over the split points
        h = self.layers(h)
        return self.head(h + skip)


def chained(wrapper: ReplayModelWrapper, x: torch.Tensor) -> torch.Tensor:
    values = (x,)
    for stage in wrapper.stages[:-1]:
        values = stage(*values)
    return wrapper.stages[-1](*values)


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
    out = wrapper.stages[0](torch.randn(3, 8))
    assert isinstance(out, tuple) and len(out) == 2


def test_training_a_traced_model_matches_stage_gradients():
    model = ResNetish()
    wrapper = ReplayModelWrapper(model, num_modules=3)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9), wrapper)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_torchvision_resnet_splits_and_trains():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    wrapper = ReplayModelWrapper(model, split_points=["layer2", "layer3.1.conv1", "layer4"])
    wrapper.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(chained(wrapper, x), model(x), rtol=0, atol=0)
    wrapper.train()
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    for _ in range(4):
        F.cross_entropy(wrapper(x), torch.tensor([1, 2])).backward()
        opt.step()
        opt.zero_grad()


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
