from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def mlp(depth: int = 6, width: int = 16, inputs: int = 8, classes: int = 4, dtype=torch.float32) -> nn.Sequential:
    """A deep tanh MLP as an nn.Sequential: Linear, Tanh, Linear, Tanh, ..., Linear."""
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers).to(dtype)


def bn_dropout_net() -> nn.Sequential:
    """An MLP with BatchNorm and dropout in the first two of its three modules."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip


def batches(n: int, batch: int = 16, inputs: int = 8, classes: int = 4, last: int | None = None, seed: int = 0):
    """``n`` fixed (x, y) batches; the last one has ``last`` rows when given (a smaller last batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = last if (last is not None and i == n - 1) else batch
        x = torch.randn(rows, inputs, generator=g)
        y = torch.randint(0, classes, (rows,), generator=g)
        out.append((x, y))
    return out


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
    """Residual blocks whose skips live in forward(), and a long skip over every split point."""

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


def chained(wrapper: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The wrapper's stages called one after another."""
    values = (x,)
    for stage in wrapper.stages[:-1]:
        values = stage(*values)
    return wrapper.stages[-1](*values)


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cpu_cluster():
    """Two real processes joined by gloo, with ACCELERATE_USE_CPU=1 as the recipes are launched on CPU;
    shared by the recipes' multi-process tests (starting them costs seconds)."""
    from cluster import Cluster

    c = Cluster(2, env={"ACCELERATE_USE_CPU": "1"})
    yield c
    c.close()


@pytest.fixture(scope="session")
def hf_files(tmp_path_factory):
    """The local files of the Hugging Face tests (``tests/trainer_tasks.py``: text, csv, a trained tokenizer, tiny
    models written by ``save_pretrained``), written once per session."""
    import trainer_tasks

    root = tmp_path_factory.mktemp("hf_files")
    trainer_tasks.prepare(str(root))
    return str(root)
