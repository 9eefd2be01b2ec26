"""The paper's sufficient-direction constant sigma, per module (Section 5.2, Figure 3), measured honestly.

The paper's assumption: the gradient g^t a method applies satisfies, in expectation,
<grad f(w^t), g^t> >= sigma ||grad f(w^t)||^2, with grad f the *expected* gradient.  Module k's
g^t comes from the samples of batch t - D_k (D_k = K - k: the error signal travels down one module
per step).  Comparing it with the gradient of the *current* batch t mixes two mini-batches, so
mini-batch noise biases that sigma low -- and makes it fall as the learning rate drops.  This probe
reports two quantities instead, each named for what it measures:

* ``sigma_staleness`` -- staleness alone: the true gradient of the *same samples* (batch t - D_k) at
  the current weights w^t, against g^t.  1 for the last module and for BP, exactly; how far below 1
  is what the stale error signal costs.
* ``sigma_expected`` -- an estimate of the paper's sigma: the true gradient at w^t of a large
  *reference batch* (an estimate of the expected gradient), against g^t.  Noisy step to step (g^t is
  one mini-batch); averaged over steps it estimates sigma.

With the cosines of the same pairs.  Every ``every`` steps (call ``measure`` every step, after
``backward()``, before ``optimizer.step()``), the true gradients cost K + 1 extra forward and
backward passes, with BatchNorm statistics frozen and the training RNG untouched.  One process.

    probe = SigmaProbe(model, loss_fn=F.cross_entropy, every=10, reference=(x_ref, y_ref))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        probe.measure((x,), y)
        optimizer.step()
        optimizer.zero_grad()
    probe.records  # [{"step", "sigma_staleness", "sigma_expected", "cosine_staleness", "cosine_expected"}, ...]
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .bypass import engine_running
from .methods.batchnorm import frozen_running_stats
from .methods.history import detached, to_device

if TYPE_CHECKING:
    from .wrapper import ReplayModelWrapper

Batch = tuple[Any, Any]  # (inputs: a tuple of positional inputs or a dict of keyword inputs, target)


class SigmaProbe:
    def __init__(
        self,
        model: ReplayModelWrapper,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        every: int = 10,
        reference: Batch | Callable[[], Batch] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if model.rank is not None:
            raise ValueError("SigmaProbe runs in one process; with one process per module measure in one process")
        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.reference = reference
        self.records: list[dict[str, Any]] = []
        self.step = 0
        self._recent: deque[Batch] = deque(maxlen=model.num_modules)  # batches t-K+1 .. t

    def measure(self, inputs: Any, target: Any) -> dict[str, Any] | None:
        """Record this step's batch; every ``every`` steps, sigma and cosine per module (returned, and kept)."""
        batch = (_detach(inputs), _detach(target))
        self._recent.append(batch)
        step, self.step = self.step, self.step + 1
        if step % self.every:
            return None
        optimizer = self.model.replay_optimizer
        if optimizer is not None:
            optimizer.compensation.restore()  # w^t itself, not a linear weight prediction
        stages = self.model.partition.stages
        k = len(stages)
        scale = getattr(getattr(optimizer, "grad_scaler", None), "_scale", None)
        applied = [_flat([p.grad for p in s.parameters()], s.parameters(), scale) for s in stages]
        record: dict[str, Any] = {"step": step, "sigma_staleness": [], "cosine_staleness": []}
        for stage, g in zip(stages, applied):
            delay = (k - 1 - stage.index) if self.model.method in ("fr", "ddg") else 0
            if delay >= len(self._recent):  # the module has not started yet
                record["sigma_staleness"].append(float("nan"))
                record["cosine_staleness"].append(float("nan"))
                continue
            true = self._true_gradient(self._recent[-1 - delay])[stage.index]
            sigma, cosine = _sigma(true, g)
            record["sigma_staleness"].append(sigma)
            record["cosine_staleness"].append(cosine)
        if self.reference is not None:
            reference = self.reference() if callable(self.reference) else self.reference
            true_ref = self._true_gradient(reference)
            pairs = [_sigma(t, g) for t, g in zip(true_ref, applied)]
            record["sigma_expected"] = [s for s, _ in pairs]
            record["cosine_expected"] = [c for _, c in pairs]
        self.records.append(record)
        return record

    def _true_gradient(self, batch: Batch) -> list[torch.Tensor]:
        """Plain backprop of ``loss_fn`` on ``batch`` through every module at the current weights, per module."""
        inputs, target = batch
        args, kwargs = (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((), dict(inputs))
        partition = self.model.partition
        stages = partition.stages
        devices = [s.device for s in stages if s.device.type != "cpu"]
        with contextlib.ExitStack() as stack, torch.enable_grad(), engine_running():  # (a measurement: nothing trains)
            stack.enter_context(
                torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cuda")
            )
            stack.enter_context(partition.using(partition.current))
            for s in stages:
                stack.enter_context(frozen_running_stats(s.train))
            x = partition.select(partition.bind(args, kwargs), training=True).inputs
            for s in stages[:-1]:
                x = s.train(*to_device(x, s.device))
            out = stages[-1].train(*to_device(x, stages[-1].device))
            params = [p for s in stages for p in s.parameters()]
            grads = torch.autograd.grad(self.loss_fn(out, target), params, allow_unused=True)
        per_stage, offset = [], 0
        for s in stages:
            ps = s.parameters()
            per_stage.append(_flat(list(grads[offset : offset + len(ps)]), ps, None))
            offset += len(ps)
        return per_stage


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return detached(value)
    return value


def _sigma(true: torch.Tensor, applied: torch.Tensor) -> tuple[float, float]:
    dot = torch.dot(true.double(), applied.double().to(true.device))
    tt, gg = true.double().norm(), applied.double().norm()
    sigma = (dot / tt.pow(2)).item() if tt > 0 else float("nan")
    cosine = (dot / (tt * gg)).item() if tt > 0 and gg > 0 else float("nan")
    return sigma, cosine


def _flat(
    grads: list[torch.Tensor | None], params: list[torch.nn.Parameter], scale: torch.Tensor | None
) -> torch.Tensor:
    if not params:
        return torch.zeros(0)
    device = params[0].device
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(device) for g, p in zip(grads, params)])
    return flat / scale.to(device) if scale is not None else flat
