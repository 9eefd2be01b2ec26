"""BatchNorm: running statistics updated exactly once per batch; replays normalise with batch statistics."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import batches
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip


def test_running_stats_updated_once_per_batch():
    """With lr=0 the weights stay put, so the running statistics must equal those of a plain model
    that saw each batch once in train mode; the authors' code (twice) would fail this."""
    model = bn_net()
    reference = copy.deepcopy(model)
    wrapper = ReplayModelWrapper(model, split_points=["3", "6"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.0), wrapper)
    data = batches(7, last=5)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            reference(x)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
    assert all(int(m.num_batches_tracked) == len(data) for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_replay_uses_the_replayed_batch_statistics():
    """Replayed outputs equal played outputs (lr=0): running statistics would differ from batch statistics."""
    model = bn_net()
    wrapper = ReplayModelWrapper(model, split_points=["3", "6"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.0), wrapper)
    played, replayed = [], []
    stage = wrapper.stages[0]
    stage.register_forward_hook(
        lambda m, i, o: (replayed if torch.is_grad_enabled() else played).append(o[0].detach().clone())
    )
    for x, y in batches(5):
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert len(replayed) == 3  # module 1 of 3 replays from step 2 on
    for t, out in enumerate(replayed):
        assert torch.equal(out, played[t])
