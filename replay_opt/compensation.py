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

Two more work with any ``torch.optim`` optimizer (AdamW, Adafactor-style, ...), because they read
what the optimizer does rather than how it does it:

* ``"predict"`` -- weight prediction from the optimizer's own last update, as SpecTrain (Chen et
  al., 2018) and XPipe (Guan et al., 2019) do for Adam: with u = w_t - w_{t-1}, the update the
  inner ``step()`` actually applied, module k's forward passes (play and replay) and their
  backward run at w + D_k u, and the gradient is applied to w itself.  u is kept per parameter in
  the inner optimizer's state (``"replay_update"``), so it travels in its state dict.
* ``"adam"`` -- weight prediction along Adam's own direction (PipeOptim, Guan et al.'s XPipe for Adam): module
  k's forward passes and their backward run at w - lr D_k m_hat / (sqrt(v_hat) + eps), with m_hat, v_hat the
  bias-corrected moments the optimizer holds (``exp_avg``, ``exp_avg_sq``, ``step``) and lr its current learning
  rate; the gradient is applied to w itself.  Parameters without Adam moments (Muon's, in a chain) are not moved.
* ``"momentum"`` -- a delay of D steps acts like extra momentum ("asynchrony begets momentum",
  Mitliagkas et al., 2016): module k steps with its momentum coefficient raised to the power
  1 + D_k (``betas[0]`` of Adam-style optimizers, ``momentum`` of SGD), 0.9 -> 0.81 at D = 1.

They combine: ``compensation="spike+warmup"``, ``"predict+momentum"``.  The last module (D = 0), K = 1 and
``method="bp"`` are untouched, bit for bit.  The step count ``t`` travels in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

REMEDIES = ("spike", "lwp", "warmup", "predict", "adam", "momentum")
UPDATE = "replay_update"  # the inner optimizer's per-parameter state entry that "predict" keeps


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
        self._predicted: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (parameter, its own weights)
        if self.remedies & {"spike", "lwp"}:
            for group in optimizer.param_groups:
                if not isinstance(optimizer, torch.optim.SGD) or group.get("momentum", 0) <= 0:
                    raise ValueError(
                        f"compensation={spec!r}: spike compensation and linear weight prediction are defined for "
                        f"SGD with momentum; got {type(optimizer).__name__} (use compensation='warmup' with others)"
                    )
                if group.get("nesterov") or group.get("dampening", 0) != 0:
                    raise ValueError(f"compensation={spec!r} needs SGD without nesterov and dampening")
        if "adam" in self.remedies and not any(_adam_like(g) for g in optimizer.param_groups):
            raise ValueError(
                f"compensation={spec!r}: Adam-direction prediction needs an Adam-style optimizer (betas and eps in its "
                f"parameter groups); got {type(optimizer).__name__} (use compensation='predict' with others)"
            )
        if len(self.remedies & {"lwp", "predict", "adam"}) > 1:
            raise ValueError(f"compensation={spec!r}: choose one weight prediction of lwp, predict and adam")
        if "momentum" in self.remedies:
            for group in optimizer.param_groups:
                if not _momentum_key(group):
                    raise ValueError(
                        f"compensation={spec!r}: {type(optimizer).__name__} has no momentum coefficient to adjust "
                        "(no betas, no momentum > 0 in its parameter groups); use compensation='predict'"
                    )

    @property
    def active(self) -> bool:
        return bool(self.remedies) and any(d > 0 for d in self.delays.values())

    # ----------------------------------------------------------------------- linear weight prediction

    def predict(self) -> None:
        """Before a training forward: put each delayed module's predicted weights in place (LWP, predict)."""
        if not (self.remedies & {"lwp", "predict", "adam"}) or self._predicted:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                delay = self.delays.get(id(p), 0)
                state = self.optimizer.state.get(p, {}) if delay else {}
                if "lwp" in self.remedies:
                    direction, scale = state.get("momentum_buffer"), -group["lr"] * delay
                elif "adam" in self.remedies:
                    direction, scale = _adam_direction(group, state), -group["lr"] * delay
                else:
                    direction, scale = state.get(UPDATE), float(delay)
                if delay and direction is not None:
                    own = p.detach().clone()
                    with torch.no_grad():
                        p.add_(direction, alpha=scale)
                    self._predicted.append((p, own))

    def restore(self) -> None:
        """Before the optimizer step (and a state dict): the weights themselves again."""
        with torch.no_grad():
            for p, own in self._predicted:
                p.copy_(own)
        self._predicted = []

    # ----------------------------------------------------------------------- the step

    def step(self, inner_step: Callable[[], Any]) -> None:
        """The inner optimizer's step with spike compensation, the warm-up and the momentum correction, per module
        delay; with "predict", the update each delayed parameter received is kept for the next prediction."""
        self.restore()
        before = self._delayed_weights() if self.active and "predict" in self.remedies else []
        self._step(inner_step)
        with torch.no_grad():
            for p, own in before:
                if p in self.optimizer.state:  # (stepped: the optimizer holds its state)
                    self.optimizer.state[p][UPDATE] = p.detach() - own

    def _delayed_weights(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, a copy of its weights) for each delayed parameter about to be stepped."""
        return [(p, p.detach().clone()) for group in self.optimizer.param_groups for p in group["params"]
                if p.grad is not None and self.delays.get(id(p), 0) > 0]  # fmt: skip

    def _step(self, inner_step: Callable[[], Any]) -> None:
        if not self.active or not (self.remedies & {"spike", "warmup", "momentum"}):
            inner_step()
            self.steps += 1
            return
        by_delay: dict[int, list[torch.nn.Parameter]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_delay.setdefault(self.delays.get(id(p), 0), []).append(p)
        for delay, params in sorted(by_delay.items()):
            with self._only(params), self._scaled_lr(self._warmup_factor(delay)) as lrs, self._momentum(delay):
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

    @contextlib.contextmanager
    def _momentum(self, delay: int) -> Iterator[None]:
        """The groups' momentum coefficients raised to the power 1 + delay for the body ("momentum")."""
        if "momentum" not in self.remedies or delay == 0:
            yield
            return
        saved = [(group, key, group[key]) for group in self.optimizer.param_groups if (key := _momentum_key(group))]
        for group, key, value in saved:
            group[key] = (value[0] ** (1 + delay), *value[1:]) if key == "betas" else value ** (1 + delay)
        try:
            yield
        finally:
            for group, key, value in saved:
                group[key] = value

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

    def state_dict(self) -> dict[str, Any]:  # ("predict" keeps its updates in the inner optimizer's state)
        return {"remedies": sorted(self.remedies), "warmup_steps": self.warmup_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(self.remedies) != state.get("remedies", []):
            raise ValueError(
                f"the checkpoint was trained with compensation {state.get('remedies')}, this optimizer uses "
                f"{sorted(self.remedies)}: pass the same compensation= to resume"
            )
        self.steps = int(state["steps"])


def _adam_like(group: dict[str, Any]) -> bool:
    """Whether a parameter group is an Adam-style optimizer's (betas and eps)."""
    return isinstance(group.get("betas"), (tuple, list)) and "eps" in group


def _adam_direction(group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor | None:
    """m_hat / (sqrt(v_hat) + eps) from an Adam-style state (None before its first step, or without moments)."""
    if not _adam_like(group) or "exp_avg" not in state or "exp_avg_sq" not in state:
        return None
    step = float(state["step"])
    beta1, beta2 = group["betas"][0], group["betas"][1]
    second = state.get("max_exp_avg_sq", state["exp_avg_sq"]) if group.get("amsgrad") else state["exp_avg_sq"]
    m_hat = state["exp_avg"] / (1 - beta1**step)
    v_hat = second / (1 - beta2**step)
    return m_hat / (v_hat.sqrt() + group["eps"])


def _momentum_key(group: dict[str, Any]) -> str | None:
    """Which entry of a parameter group holds its momentum coefficient: ``betas`` (Adam-style) or ``momentum``."""
    if isinstance(group.get("betas"), (tuple, list)) and group["betas"] and group["betas"][0]:
        return "betas"
    return "momentum" if group.get("momentum", 0) else None
