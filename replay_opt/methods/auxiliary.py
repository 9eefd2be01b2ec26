"""Modules a method adds beside the model: DNI's gradient synthesizers, DGL's auxiliary heads.

They are built on first use, when the shape of the activation they attach to
is known, on that activation's device, and trained by an optimizer of their own
of the same class and hyperparameters as the user's (its learning rate follows
the user's first param group, so LR schedules apply).  Their weights and
optimizer state travel in ``ReplayOptimizer.state_dict()``; a checkpoint loaded
before they exist is applied when they are built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Auxiliary:
    def __init__(self, build: Callable[[torch.Tensor], nn.Module]) -> None:
        self.build = build
        self.modules: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.template: torch.optim.Optimizer | None = None  # the user's optimizer
        self._pending: dict[str, Any] | None = None

    def get(self, key: str, example: torch.Tensor) -> nn.Module:
        if key not in self.modules:
            dtype = example.dtype if example.dtype in (torch.float32, torch.float64) else torch.float32
            # Forked: initialising weights must not move the training RNG, or a run that
            # builds them after resuming would draw different dropout masks than one that did not.
            with torch.random.fork_rng(devices=[]):
                module = self.build(example).to(device=example.device, dtype=dtype)
            if self._pending is not None and key in self._pending["modules"]:
                module.load_state_dict(self._pending["modules"][key])
            self.modules[key] = module
        return self.modules[key]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One optimizer step on the gradients the auxiliary modules hold, then clear them.

        ``grad_scale``: the loss scale those gradients still carry (a GradScaler
        unscales only the user's optimizer).
        """
        if not self.modules:
            return
        if grad_scale is not None:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.div_(grad_scale.to(p.grad.device))
        if self.optimizer is None:
            self.optimizer = self._make_optimizer()
            if self._pending is not None and self._pending.get("optimizer"):
                self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None
        if self.template is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.template.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.template is None:
            return torch.optim.SGD(params, lr=0.01)
        hyper = {k: v for k, v in self.template.defaults.items() if k not in ("differentiable",)}
        hyper["lr"] = self.template.param_groups[0]["lr"]
        return type(self.template)(params, **hyper)

    def state_dict(self) -> dict[str, Any]:
        pending = self._pending or {"modules": {}, "optimizer": None}
        return {
            "modules": {**pending["modules"], **{k: m.state_dict() for k, m in self.modules.items()}},
            "optimizer": pending["optimizer"] if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state
        for key, module in self.modules.items():
            if key in state["modules"]:
                module.load_state_dict(state["modules"][key])
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            self._pending = None
