"""Decoupled Greedy Learning (Belilovsky, Eickenberg & Oyallon, 2019/2021).

Each module k < K trains against a small auxiliary classifier of its own
(global average pooling and a linear layer), module K against the real loss; no
gradient crosses a boundary, so no module ever waits for another in the
backward pass.  Not in the paper, but the strongest modern baseline of the
family.

The auxiliary classifiers need the labels, which the wrapper never sees (the
loop stays ``loss = criterion(model(x), y)``).  They are recovered from the loss
gradient instead: for the mean cross-entropy ``F.cross_entropy`` computes
(label smoothing and probability targets included), d loss / d logits =
(softmax(logits) - p) / N, so p = softmax(logits) - N * grad.  Each head is then
trained with the same cross-entropy against p -- its gradient,
(softmax(head) - p) / N, is formed in closed form inside the user's backward.
DGL therefore assumes a mean cross-entropy on logits of shape (N, C).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cut.partition import Stage
from .auxiliary import Auxiliary
from .base import Method
from .history import detached, to_device


class _HeadsFollowTheLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor | None, logits: torch.Tensor, *heads: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(logits, *heads)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        logits, *heads = ctx.saved_tensors
        s = 1.0 if ctx.scale is None else ctx.scale.to(grad.device)
        factor = s / logits.shape[0]
        target = torch.softmax(logits.float(), -1)  # p = target - grad * N / s, folded in below
        head_grads = [
            (grad.to(h.device).float() + factor * (torch.softmax(h.float(), -1) - target.to(h.device))).to(h.dtype)
            for h in heads
        ]
        return (None, grad, *head_grads)


class GreedyLocal(Method):
    name = "dgl"

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(stages)
        self.num_classes: int | None = None
        self.aux = Auxiliary(self._head)

    def _head(self, features: torch.Tensor) -> nn.Module:
        assert self.num_classes is not None
        if features.dim() == 4:
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features.shape[1], self.num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(features[0].numel(), self.num_classes))

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self.aux.template = optimizer

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        features = []
        x = detached(inputs)
        for i, stage in enumerate(self.stages[:-1]):
            x = to_device(x, stage.device)
            with self.meter.stage(i):
                out = stage.train(*x)  # the input is detached: no gradient goes down
            features.append(next(v for v in out if isinstance(v, torch.Tensor) and v.requires_grad))
            x = detached(out)
        last = self.stages[-1]
        with self.meter.stage(len(self.stages) - 1):
            logits = last.train(*to_device(x, last.device))
        if not features:
            return logits
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(
                'method="dgl" trains auxiliary classifiers with the labels recovered from a cross-entropy loss '
                "and needs the model to return class logits of shape (N, C)"
            )
        self.num_classes = logits.shape[1]
        heads = []
        for i, f in enumerate(features):
            with self.meter.stage(i):
                heads.append(self.aux.get(str(i), f)(f))
        return _HeadsFollowTheLoss.apply(getattr(self.grad_scaler, "_scale", None), logits, *heads)

    def before_step(self) -> None:
        self.aux.step(getattr(self.grad_scaler, "_scale", None))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "heads": self.aux.state_dict(), "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.num_classes = state["num_classes"]
        self.aux.load_state_dict(state["heads"])
