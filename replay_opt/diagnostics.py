"""The paper's sufficient-direction constant sigma, per module (Section 5.2, Figure 3).

Every ``every`` optimizer steps, the gradient g^t a method actually applies to
module k is compared with the true backprop gradient of the same loss, on the
same batch, at the same weights w^t:

    sigma_k = <grad f(w^t)_k, g_k^t> / ||grad f(w^t)_k||^2,   cosine_k = <., .> / (||.|| ||.||)

The wrapper never sees the loss function, only the gradient it sends into the
model output.  That is all the true gradient needs: the batch is run through
every module once more, with a graph, the RNG state of the step's forward (so
dropout draws the same masks as the play pass) and BatchNorm statistics frozen,
and ``d loss / d output`` from the user's backward is back-propagated through it.
With a GradScaler the captured gradient is unscaled first.  Costs one extra
forward and backward on diagnostic steps; off unless ``diagnostics_every`` is set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batchnorm import frozen_running_stats
from .history import detached, to_device
from .partition import Stage


class _CaptureGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, box: dict[int, torch.Tensor], index: int, t: torch.Tensor) -> torch.Tensor:
        ctx.box, ctx.index = box, index
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        ctx.box[ctx.index] = grad.detach()
        return None, None, grad


@dataclass
class _Capture:
    inputs: tuple[Any, ...]
    cpu_rng: torch.Tensor
    device_rng: dict[torch.device, torch.Tensor]
    output_grads: dict[int, torch.Tensor] = field(default_factory=dict)


class SufficientDirection:
    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"diagnostics_every must be a positive number of steps, got {every}")
        self.every = every
        self.records: list[dict[str, Any]] = []
        self._capture: _Capture | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def watch(self, inputs: tuple[Any, ...], stages: list[Stage]) -> None:
        """Call at the start of a diagnostic step's training forward."""
        devices = {s.device for s in stages if s.device.type != "cpu"}
        device_rng = {d: torch.get_device_module(d.type).get_rng_state(d) for d in devices}
        self._capture = _Capture(detached(inputs), torch.get_rng_state(), device_rng)

    def wrap_output(self, output: Any) -> Any:
        """Route the output through identities that record the gradient the loss sends into it."""
        if self._capture is None:
            return output
        leaves, spec = tree_flatten(output)
        box = self._capture.output_grads
        leaves = [
            _CaptureGrad.apply(box, i, t) if isinstance(t, torch.Tensor) and t.requires_grad else t
            for i, t in enumerate(leaves)
        ]
        return tree_unflatten(leaves, spec)

    def measure(self, step: int, stages: list[Stage], grad_scale: torch.Tensor | None) -> dict[str, Any] | None:
        """Call after backward, before the optimizer step: record sigma and cosine per module."""
        capture, self._capture = self._capture, None
        if capture is None or not capture.output_grads:
            return None
        devices = list(capture.device_rng)
        with contextlib.ExitStack() as stack, torch.enable_grad():
            stack.enter_context(
                torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cuda")
            )
            torch.set_rng_state(capture.cpu_rng)
            for d, state in capture.device_rng.items():
                torch.get_device_module(d.type).set_rng_state(state, d)
            for s in stages:
                stack.enter_context(frozen_running_stats(s.train))
            x = capture.inputs
            for s in stages:
                x = s.train(*to_device(x if isinstance(x, tuple) else (x,), s.device))
            leaves, _ = tree_flatten(x)
            outs = [leaves[i] for i in capture.output_grads]
            grads = list(capture.output_grads.values())
            params = [p for s in stages for p in s.parameters()]
            true = torch.autograd.grad(outs, params, grads, allow_unused=True)
        record: dict[str, Any] = {"step": step, "sigma": [], "cosine": []}
        offset = 0
        for s in stages:
            ps = s.parameters()
            t_k = _flat([true[offset + j] for j in range(len(ps))], ps)
            offset += len(ps)
            if grad_scale is not None:
                t_k = t_k / grad_scale.to(t_k.device)
            g_k = _flat([p.grad for p in ps], ps)
            dot = torch.dot(t_k.double(), g_k.double())
            tt, gg = t_k.double().norm(), g_k.double().norm()
            record["sigma"].append((dot / tt.pow(2)).item() if tt > 0 else float("nan"))
            record["cosine"].append((dot / (tt * gg)).item() if tt > 0 and gg > 0 else float("nan"))
        self.records.append(record)
        return record


def _flat(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter]) -> torch.Tensor:
    if not params:
        return torch.zeros(0)
    device = params[0].device
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(device) for g, p in zip(grads, params)])
