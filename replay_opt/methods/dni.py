"""Decoupled Neural Interfaces with synthetic gradients (Jaderberg et al., 2016).

At every boundary a small network, the synthesizer, predicts the gradient of the
loss w.r.t. the activation from the activation alone.  Module k back-propagates
that prediction at once -- no waiting for the modules above -- and its
synthesizer is trained by L2 regression (mean squared error) onto the gradient
module k+1 actually sends down (itself computed from module k+1's synthetic gradient, or from the
loss for the last boundary).  The prediction is injected inside the user's
``loss.backward()`` (see ``join.py``); the regression runs in
``ReplayOptimizer.step``, when the targets exist.

The synthesizer predicts each example's own gradient (N times the gradient of a
batch-mean loss), so its targets do not shrink with the batch size; the
regression is averaged over elements, which keeps it stable under the user's
SGD settings (a summed L2 over a conv feature map diverges at usual learning
rates).  Its optimizer mirrors the user's (class, hyperparameters, learning-rate
schedule).  Synthesizers follow the paper's setup: for conv features two hidden 5x5
convolutions (padding 2) with BatchNorm and ReLU and a 5x5 output convolution;
for flat features an MLP with two hidden layers; the output layer starts at zero,
so training begins with zero synthetic gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cut.partition import Stage
from .auxiliary import Auxiliary
from .base import Method, as_leaves
from .history import detached, to_device
from .join import StaleGradients, join


def synthesizer(activation: torch.Tensor) -> nn.Module:
    if activation.dim() == 4:
        c = activation.shape[1]
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nn.Conv2d(c, c, 5, padding=2), nn.BatchNorm2d(c), nn.ReLU()]
        out: nn.Module = nn.Conv2d(c, c, 5, padding=2)
    else:
        d = activation.shape[-1]
        layers = [nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU()]
        out = nn.Linear(d, d)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class SyntheticGradients(Method):
    name = "dni"

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(stages)
        self.aux = Auxiliary(synthesizer)
        self._leaves: list[tuple[Any, ...] | None] = [None] * len(stages)
        self._predictions: list[list[tuple[int, torch.Tensor]]] = []
        self.synthesizer_loss: torch.Tensor | None = None  # L2 regression loss of the last step
        self.synthesizer_error: torch.Tensor | None = None  # ||prediction - target||^2 / ||target||^2

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self.aux.template = optimizer

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        k = len(self.stages)
        scale = getattr(self.grad_scaler, "_scale", None)
        self._leaves, self._predictions = [None] * k, [[] for _ in range(k - 1)]
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        x = detached(inputs)
        for i, stage in enumerate(self.stages[:-1]):
            x = to_device(x, stage.device)
            leaves = as_leaves(x) if i > 0 else x
            self._leaves[i] = leaves
            with self.meter.stage(i):
                out = stage.train(*leaves)
                for j, value in enumerate(out):
                    if isinstance(value, torch.Tensor) and value.requires_grad:
                        # The synthesizer predicts each example's own gradient, N times the
                        # gradient of a batch-mean loss, so its targets do not shrink with N.
                        prediction = self.aux.get(f"{i}.{j}", value)(value.detach())
                        self._predictions[i].append((j, prediction))
                        grad = prediction.detach() / value.shape[0]
                        if scale is not None:
                            grad = grad * scale.to(value.device)
                        outputs.append(value)
                        grads.append(grad)
                        self.meter.add(i, "stale_gradients", [grad])
            x = detached(out)
        last = self.stages[-1]
        x = to_device(x, last.device)
        if k > 1:
            x = as_leaves(x)
            self._leaves[-1] = x
        with self.meter.stage(k - 1):
            out = last.train(*x)
        return join(out, StaleGradients(outputs, grads))

    def before_step(self) -> None:
        scale = getattr(self.grad_scaler, "_scale", None)
        losses, relative = [], []
        for i, predictions in enumerate(self._predictions):
            upper = self._leaves[i + 1]
            for j, prediction in predictions:
                target = upper[j].grad if upper is not None else None
                if target is None:
                    continue
                target = target.detach().to(prediction.device).float() * prediction.shape[0]
                if scale is not None:
                    target = target / scale.to(target.device)
                error = (prediction.float() - target).pow(2).sum()
                losses.append(error / prediction.numel())
                relative.append(error.detach() / target.pow(2).sum().clamp_min(1e-30))
        self._predictions = []
        if losses:
            loss = torch.stack(losses).sum()
            loss.backward()
            self.synthesizer_loss = loss.detach()
            self.synthesizer_error = torch.stack(relative).mean()
            self.aux.step()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "synthesizers": self.aux.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.aux.load_state_dict(state["synthesizers"])
