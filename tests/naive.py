"""Algorithm 1 written out by hand, independent of replay_opt: the reference ``test_fr.py`` and ``bench/gpu.py``
check the library against (explicit histories, explicit stale gradients, one optimizer per module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def naive_features_replay(stages: list[nn.Module], data, make_opt) -> list[list[int]]:
    """Algorithm 1 written out by hand: explicit histories, explicit stale gradients, one optimizer per module.

    Returns, per step, the (0-based) modules that took an optimizer step.
    """
    k_total = len(stages)
    opts = [make_opt(s.parameters()) for s in stages]
    history: list[list[torch.Tensor]] = [[] for _ in stages]  # history[k][s]: input of module k at step s
    stale: list[torch.Tensor | None] = [None] * k_total  # stale[k]: gradient for module k's output, from step t-1
    updated = []
    for t, (x, y) in enumerate(data):
        # Play: forward with the current weights, no graph; store every module's input.
        h = x
        with torch.no_grad():
            for k in range(k_total - 1):
                history[k].append(h)
                h = stages[k](h)
        # Gradients of every module at w^t, computed before any module updates.
        grads: dict[int, list[torch.Tensor]] = {}
        new_stale: list[torch.Tensor | None] = [None] * k_total
        inp = h.detach().requires_grad_(k_total > 1)
        loss = F.cross_entropy(stages[-1](inp), y)
        params = list(stages[-1].parameters())
        g = torch.autograd.grad(loss, ([inp] if k_total > 1 else []) + params)
        if k_total > 1:
            new_stale[k_total - 2], g = g[0], g[1:]
        grads[k_total - 1] = list(g)
        for k in range(k_total - 1):
            s = t - (k_total - 1 - k)  # replay the input stored K-k steps ago (1-based k)
            if s < 0 or stale[k] is None:
                continue
            inp = history[k][s].detach().requires_grad_(k > 0)
            out = stages[k](inp)  # with the *current* weights
            params = list(stages[k].parameters())
            g = torch.autograd.grad(out, ([inp] if k > 0 else []) + params, grad_outputs=stale[k])
            if k > 0:
                new_stale[k - 1], g = g[0], g[1:]
            grads[k] = list(g)
        step_modules(stages, opts, grads)
        updated.append(sorted(grads))
        stale = new_stale
    return updated


def step_modules(stages: list[nn.Module], opts, grads: dict[int, list[torch.Tensor]]) -> None:
    """Each module that has gradients this step takes its own optimizer step; the others do nothing."""
    for k, gs in grads.items():
        for p, gp in zip(stages[k].parameters(), gs):
            p.grad = gp
        opts[k].step()
        opts[k].zero_grad()


def sequential_stages(model: nn.Sequential, split: list[int]) -> list[nn.Sequential]:
    bounds = [0, *split, len(model)]
    return [nn.Sequential(*[model[j] for j in range(bounds[i], bounds[i + 1])]) for i in range(len(bounds) - 1)]


# A model the reference is checked on: not an nn.Sequential, so the library traces it (BatchNorm, residuals).


class ConvBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Not an nn.Sequential: the library must trace it with torch.fx."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[ConvBlock(c) for _ in range(4)])
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        h = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
