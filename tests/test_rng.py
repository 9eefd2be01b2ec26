"""Replays reproduce the play pass's random draws (dropout), bit for bit when the weights do not move."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import batches
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer


class NoisyBlock(nn.Module):
    """Dropout plus an RNG draw inside forward (like stochastic depth)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.tanh(self.fc(x))) + 0.1 * torch.randn_like(x)


def test_replayed_outputs_equal_played_outputs_bit_for_bit():
    model = nn.Sequential(nn.Linear(8, 16), NoisyBlock(), NoisyBlock(), NoisyBlock(), nn.Linear(16, 4))
    k = 4
    wrapper = ReplayModelWrapper(model, split_points=["1", "2", "3"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.0), wrapper)
    played = {i: [] for i in range(k - 1)}
    replayed = {i: [] for i in range(k - 1)}
    for i in range(k - 1):
        wrapper.stages[i].register_forward_hook(
            lambda m, inp, out, i=i: (replayed if torch.is_grad_enabled() else played)[i].append(out[0].detach())
        )
    steps = 7
    for x, y in batches(steps):
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    for i in range(k - 1):
        lag = k - 1 - i  # module i+1 replays the input it played K-k steps earlier
        assert len(replayed[i]) == steps - lag
        for t, out in enumerate(replayed[i]):
            assert torch.equal(out, played[i][t])
        assert not torch.equal(played[i][0], played[i][1])  # the draws do differ from step to step


def test_replay_leaves_the_global_generator_alone():
    """The RNG stream seen by the user's code is the one the plays consumed: replays are forked."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    wrapper = ReplayModelWrapper(model, split_points=["2"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.0), wrapper)
    x, y = batches(1)[0]
    F.cross_entropy(wrapper(x), y).backward()
    opt.step()
    opt.zero_grad()
    torch.manual_seed(123)
    wrapper(x).sum().backward()  # play of module 1 + replay of module 1 + module 2
    after_step = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        model(x)  # one plain forward consumes the same draws as the plays
    assert torch.equal(after_step, torch.rand(3))
