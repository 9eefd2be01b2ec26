"""Staleness compensation: per module, for the delay D_k = K - k of its gradient.

Module k's gradient carries the loss of a batch K-k steps old (the error signal travels down
one module per step), the staleness of asynchronous pipelined backpropagation.  Three remedies
from that literature, opt-in through ``ReplayOptimizer(..., compensation=...)``:

* ``"spike"`` -- Spike Compensation (Kosson et al., 2020, "Pipelined Backpropagation at Scale",
  Sec. 4.1), for SGD with momentum m.  A gradient that arrives D steps late has missed the first
  D of the updates momentum would have made with it; the update applies them at once:

      v <- m v + g,     w <- w - lr (a v + b g),     a = m^D,  b = (1 - m^D) / (1 - m)

  (D = 0: a = 1, b = 0, plain momentum SGD).
* ``"lwp"`` -- Linear Weight Prediction (Kosson et al., Sec. 4.2): module k's forward passes
  (play and replay) and their backward run with its weights extrapolated D_k steps along the
  momentum, w - lr D_k v, and the gradient is applied to the weights themselves.
* ``"warmup"`` -- learning-rate warm-up per module, in the spirit of PipeMare (Yang et al.,
  2021): module k's learning rate is scaled by (1 + D_k)^-(1 - t/T) during the first T steps
  (``"warmup:T"``, default T = 1000), so the most delayed modules start slowest.

They combine: ``compensation="spike+warmup"``.  The last module (D = 0), K = 1 and
``method="bp"`` are untouched, bit for bit.  The step count ``t`` travels in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

REMEDIES = ("spike", "lwp", "warmup")


def parse(spec: str | Sequence[str] | None) -> tuple[set[str], int]:
    """``"spike+warmup:500"`` -> ({"spike", "warmup"}, 500)."""
    if spec is None:
        return set(), 0
    parts = spec.replace(",", "+").split("+") if isinstance(spec, str) else list(spec)
    chosen, warmup = set(), 1000
    for part in (p.strip() for p in parts if p.strip()):
        name, _, value = part.partition(":")
        if name not in REMEDIES:
            raise ValueError(f"unknown compensation {name!r}; choose from {REMEDIES}, combined with '+' "
                             "(e.g. 'spike+warmup:500')")  # fmt: skip
        if value:
            if name != "warmup" or not value.isdigit() or int(value) < 1:
                raise ValueError(f"compensation {part!r}: only warmup takes a value, a positive number of steps")
            warmup = int(value)
        chosen.add(name)
    return chosen, warmup


class Compensation:
    """Applies the chosen remedies around the inner optimizer's step, module by module."""

    def __init__(self, spec: str | Sequence[str] | None, optimizer: torch.optim.Optimizer, delays: dict[int, int]):
        self.remedies, self.warmup_steps = parse(spec)
        self.optimizer = optimizer
        self.delays = delays  # id(parameter) -> D of the module it belongs to (the smallest, if shared)
        self.steps = 0
        self._predicted: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # LWP: (parameter, its own weights)
        if self.remedies & {"spike", "lwp"}:
            for group in optimizer.param_groups:
                if not isinstance(optimizer, torch.optim.SGD) or group.get("momentum", 0) <= 0:
                    raise ValueError(
                        f"compensation={spec!r}: spike compensation and linear weight prediction are defined for "
                        f"SGD with momentum; got {type(optimizer).__name__} (use compensation='warmup' with others)"
                    )
                if group.get("nesterov") or group.get("dampening", 0) != 0:
                    raise ValueError(f"compensation={spec!r} needs SGD without nesterov and dampening")

    @property
    def active(self) -> bool:
        return bool(self.remedies) and any(d > 0 for d in self.delays.values())

    # ----------------------------------------------------------------------- linear weight prediction

    def predict(self) -> None:
        """Before a training forward: put each delayed module's predicted weights in place (LWP)."""
        if "lwp" not in self.remedies or self._predicted:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                delay = self.delays.get(id(p), 0)
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if delay and buf is not None:
                    own = p.detach().clone()
                    with torch.no_grad():
                        p.sub_(buf, alpha=group["lr"] * delay)
                    self._predicted.append((p, own))

    def restore(self) -> None:
        """Before the optimizer step (and a state dict): the weights themselves again."""
        with torch.no_grad():
            for p, own in self._predicted:
                p.copy_(own)
        self._predicted = []

    # ----------------------------------------------------------------------- the step

    def step(self, inner_step: Callable[[], Any]) -> None:
        """The inner optimizer's step with spike compensation and the warm-up, per module delay."""
        self.restore()
        if not self.active or not (self.remedies & {"spike", "warmup"}):
            inner_step()
            self.steps += 1
            return
        by_delay: dict[int, list[torch.nn.Parameter]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_delay.setdefault(self.delays.get(id(p), 0), []).append(p)
        for delay, params in sorted(by_delay.items()):
            with self._only(params), self._scaled_lr(self._warmup_factor(delay)) as lrs:
                spike = "spike" in self.remedies and delay > 0
                before = self._update_directions(params) if spike else None
                inner_step()
                if spike:
                    self._spike(params, before, delay, lrs)
        self.steps += 1

    def _warmup_factor(self, delay: int) -> float:
        if "warmup" not in self.remedies or delay == 0 or self.steps >= self.warmup_steps:
            return 1.0
        return float((1 + delay) ** -(1 - self.steps / self.warmup_steps))

    @contextlib.contextmanager
    def _only(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        keep = {id(p) for p in params}
        hidden = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in keep:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            yield
        finally:
            for p, grad in hidden:
                p.grad = grad

    @contextlib.contextmanager
    def _scaled_lr(self, factor: float) -> Iterator[dict[int, float]]:
        """The groups' learning rates, scaled for the body; yields {id(param): lr used}."""
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            yield {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr

    def _update_directions(self, params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
        """d = g + weight_decay * w for each parameter, as SGD forms it (before the step changes w)."""
        decay = {
            id(p): group.get("weight_decay", 0.0) for group in self.optimizer.param_groups for p in group["params"]
        }
        return {id(p): p.grad.detach() + decay[id(p)] * p.detach() if decay[id(p)] else p.grad.detach().clone()
                for p in params}  # fmt: skip

    def _spike(self, params: list[torch.nn.Parameter], directions: Any, delay: int, lrs: dict[int, float]) -> None:
        momentum = {id(p): group["momentum"] for group in self.optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p in params:
                m = momentum[id(p)]
                a, b = m**delay, (1 - m**delay) / (1 - m)
                buf = self.optimizer.state[p]["momentum_buffer"]
                # SGD did w -= lr v; spike compensation wants w -= lr (a v + b d).
                p.add_(buf, alpha=-lrs[id(p)] * (a - 1)).add_(directions[id(p)], alpha=-lrs[id(p)] * b)

    def state_dict(self) -> dict[str, Any]:
        return {"remedies": sorted(self.remedies), "warmup_steps": self.warmup_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(self.remedies) != state.get("remedies", []):
            raise ValueError(
                f"the checkpoint was trained with compensation {state.get('remedies')}, this optimizer uses "
                f"{sorted(self.remedies)}: pass the same compensation= to resume"
            )
        self.steps = int(state["steps"])
