"""``ReplayOptimizer``: line two of two -- step only the modules that have a gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bypass import check_no_gradients, engine_running
from .chained import ChainedOptimizer
from .compensation import Compensation
from .methods.stale import StaleGradientMethod
from .multiprocess import checkpoints
from .wrapper import ReplayModelWrapper


class ReplayOptimizer(torch.optim.Optimizer):
    """Wrap any ``torch.optim.Optimizer`` for a ``ReplayModelWrapper``.

    It is an ``Optimizer`` (so Accelerate wraps it, LR schedulers attach to it
    and ``save_state`` saves it) that delegates to the inner optimizer, with
    three differences:

    * ``step()`` skips, entirely, the parameters of modules that have no
      gradient yet (module k of K starts updating at step K-k): no weight
      decay, no momentum, no step count;
    * ``state_dict()`` also holds the replay state (input histories, stale
      gradients, counters), so a resumed run continues identically;
    * with fp16 loss scaling pass the ``GradScaler`` (``accelerator.scaler``)
      so that stale gradients are rescaled when the scale changes;
    * ``compensation=`` opts in to staleness compensation per module (``"spike"``,
      ``"lwp"``, ``"warmup[:T]"``, combined with ``+``; see ``compensation.py``).

    Several optimizers are chained: ``ReplayOptimizer([muon, adamw], model)`` steps
    both as one (``chained.py``), e.g. ``torch.optim.Muon`` on the 2-D hidden weights
    and ``AdamW`` on embeddings, norms, biases and head.

    The optimizer may have been built on the original model before wrapping:
    the wrapper trains that model's parameters in place.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        model: ReplayModelWrapper,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        compensation: str | Sequence[str] | None = None,
    ) -> None:
        # No super().__init__: param_groups, state and defaults are the inner optimizer's.
        if isinstance(optimizer, ReplayOptimizer):
            raise TypeError("the optimizer is already a ReplayOptimizer; wrap the original optimizer once")
        if isinstance(optimizer, (list, tuple)):
            if any(isinstance(o, ReplayOptimizer) for o in optimizer):
                raise TypeError("chain the original optimizers: ReplayOptimizer([muon, adamw], model), once")
            optimizer = optimizer[0] if len(optimizer) == 1 else ChainedOptimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ReplayOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, ReplayModelWrapper):
            raise TypeError(
                f"ReplayOptimizer needs the ReplayModelWrapper, got {type(model).__name__}: "
                "model = ReplayModelWrapper(model, num_modules=K); optimizer = ReplayOptimizer(optimizer, model)"
            )
        owned = {id(p) for p in model.parameters()}
        if not any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer holds none of the model's parameters; build it on this model's parameters")
        if model.replay_optimizer is not None:
            raise ValueError("this ReplayModelWrapper already has a ReplayOptimizer; create one per model")
        self.optimizer = optimizer
        self.model = model
        self._method = model.algorithm
        self._method.grad_scaler = grad_scaler
        self._method.bind(optimizer)
        self.compensation = Compensation(compensation, optimizer, self._delays())
        model.bind_optimizer(self)

    def _delays(self) -> dict[int, int]:
        """id(parameter) -> D = K - k, the age of module k's gradient (0 where nothing is stale)."""
        stale = isinstance(self._method, StaleGradientMethod)
        k = len(self._method.stages)
        delays: dict[int, int] = {}
        for stage in self._method.stages:
            for p in stage.parameters():  # a shared parameter takes its freshest module's delay
                delays[id(p)] = min(delays.get(id(p), k), k - 1 - stage.index if stale else 0)
        return delays

    # Delegation, as accelerate.optimizer.AcceleratedOptimizer does it.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self._method.grad_scaler

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._method.on_zero_grad()
        if self.model.rank is not None:
            with engine_running():
                self.model.rank.on_step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.model.take_training_forwards():  # (the parameters listed only then: not on every step)
            check_no_gradients(self.model.local_parameters(), self.model.method)
        with engine_running():  # (finishing a step may run modules: GPipe's training pass)
            self._step()
        return loss

    def _step(self) -> None:
        rank = self.model.rank
        tied_live = rank.collectives.reduce_gradients() if rank is not None else set()
        self._method.before_step()
        # Modules still waiting for their first (input, gradient) pair must not
        # move at all: hide their gradients so the optimizer skips them.
        # A parameter shared by several modules (tied weights) moves when any of them has started.
        live = {id(p) for stage, updated in zip(self._method.stages, self._method.updated_stages()) if updated
                for p in stage.parameters()} | tied_live  # fmt: skip
        hidden = []
        for stage in self._method.stages:
            for p in stage.parameters():
                if id(p) not in live and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.compensation.step(self.optimizer.step)
        finally:
            for p, grad in hidden:
                p.grad = grad
        self._method.on_step()
        if rank is not None:
            rank.on_step()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"replay"``; collective with one process per module."""
        rank = self.model.rank
        if rank is None:
            state = self.optimizer.state_dict()
            state["replay"] = self.model.replay_state_dict()
        else:
            state = checkpoints.optimizer_state_dict(
                rank, self.optimizer.state_dict(), self._local_indices(), self.model.replay_state_dict
            )
        state["compensation"] = self.compensation.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        replay = state_dict.pop("replay", None)
        compensation = state_dict.pop("compensation", None)
        if compensation is not None:
            self.compensation.load_state_dict(compensation)
        rank = self.model.rank
        if rank is not None and replay is not None:
            replay = checkpoints.load_replay(rank, replay)
        self.optimizer.load_state_dict(state_dict)
        self._drop_foreign_state()
        if replay is not None:
            self.model.load_replay_state_dict(replay)

    def before_forward(self) -> None:
        """Called by the wrapper before each training forward: linear weight prediction, when asked for."""
        self.compensation.predict()

    def on_new_program(self) -> None:
        """Called by the wrapper when a program is captured after construction (first forward, new call
        signature): the delays of its modules' parameters, and with one process per module no state for
        parameters of other ranks."""
        self.compensation.delays = self._delays()
        self._drop_foreign_state()

    def _drop_foreign_state(self) -> None:
        """With one process per module: keep optimizer state only for this rank's parameters (once they are known)."""
        if self.model.rank is None or not self.model.partition.captured:
            return
        own = {id(p) for p in self.model.local_parameters()}
        for p in [p for p in self.optimizer.state if id(p) not in own]:
            del self.optimizer.state[p]

    def _local_indices(self) -> set[int]:
        """Positions (as in ``state_dict()["state"]``) of the parameters this rank's module trains."""
        own = {id(p) for p in self.model.local_parameters()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return {i for i, p in enumerate(params) if id(p) in own}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ReplayOptimizer({self.optimizer!r})"
