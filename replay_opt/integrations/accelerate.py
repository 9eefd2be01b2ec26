"""Accelerate, with one process per module: the standard script's idioms keep their meaning.

Accelerate assumes that every process holds the whole model and its own shard of the data
(data parallelism).  With one process per module neither holds, and a standard script
changed by the two lines would be silently wrong: each rank would read another shard, the
LR scheduler would step K times per step, gradient clipping would use each rank's own
norm, metrics would mix placeholder outputs in.  So while a ``ReplayModelWrapper`` runs
one process per module (``replay_opt.multiprocess.registry.active_rank()`` is set), the Accelerate
calls below act on the pipeline; with no pipeline they are Accelerate's own, unchanged.

=====================================  ===================================================
``accelerator.prepare(loader)``         shards over data-parallel *replicas*, not processes:
                                        the K ranks of a pipeline read the same batches
scheduler from ``prepare``              steps once per optimizer step and replica (D), not
                                        once per process (K x D)
``clip_grad_norm_`` / ``_value_``       the norm of the whole model's gradient, over every
                                        module (shared parameters once), after the replicas'
                                        average
``gather`` / ``gather_for_metrics``     the last modules' values (the real outputs),
``reduce``                              concatenated or reduced over replicas, on every rank
``wait_for_everyone``                   a barrier the whole pipeline reaches together --
                                        bounded by the wrapper's ``timeout``, and any rank
                                        doing something else is named at once
``num_processes``                       the data-parallel processes: D replicas (what a
                                        script scales its learning rate, warm-up or loss by)
``unwrap_model``                        the model you wrapped (``save_pretrained``,
                                        ``state_dict()`` with its own keys and every
                                        module's current weights: collective)
``end_training``                        the ranks leave together, then the process group
                                        is released
=====================================  ===================================================

``unwrap_model`` returns the wrapped model in one process too, as it does for DDP.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import torch

from ..multiprocess.registry import active_rank

logger = logging.getLogger(__name__)


@functools.cache
def install(wrapper_class: type) -> None:
    """Patch Accelerate once (idempotent); every patch defers to Accelerate unless a pipeline runs.
    ``unwrap_model`` gives the model inside a ``wrapper_class`` (``ReplayModelWrapper``)."""
    try:
        import accelerate.accelerator as accelerator_module
        from accelerate import Accelerator
        from accelerate.scheduler import AcceleratedScheduler
        from accelerate.state import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return

    prepare_data_loader = accelerator_module.prepare_data_loader

    @functools.wraps(prepare_data_loader)
    def pipeline_prepare_data_loader(*args: Any, **kwargs: Any) -> Any:
        pipeline = _active()
        if pipeline is not None:
            kwargs["num_processes"] = pipeline.layout.replicas
            kwargs["process_index"] = pipeline.layout.replica
        return prepare_data_loader(*args, **kwargs)

    accelerator_module.prepare_data_loader = pipeline_prepare_data_loader

    step = AcceleratedScheduler.step

    @functools.wraps(step)
    def scheduler_step(self: Any, *args: Any, **kwargs: Any) -> None:
        pipeline = _active()
        if pipeline is None or self.split_batches or not self.step_with_optimizer:
            return step(self, *args, **kwargs)
        # Accelerate steps once per process; the data-parallel processes here are the D replicas.
        self.split_batches = True
        try:
            for _ in range(pipeline.layout.replicas):
                step(self, *args, **kwargs)
        finally:
            self.split_batches = False

    AcceleratedScheduler.step = scheduler_step

    _patch(Accelerator, "clip_grad_norm_", lambda pipeline, original, self, parameters, max_norm, norm_type=2:
           pipeline.collectives.clip_grad_norm_(parameters, max_norm, norm_type))  # fmt: skip

    def clip_value(pipeline: Any, original: Any, self: Any, parameters: Any, clip_value: float) -> Any:
        pipeline.collectives.reduce_gradients()
        return original(self, parameters, clip_value)

    _patch(Accelerator, "clip_grad_value_", clip_value)
    _patch(Accelerator, "gather", lambda pipeline, original, self, tensor:
           pipeline.collectives.gather_from_last_modules(tensor))  # fmt: skip

    def reduce(pipeline: Any, original: Any, self: Any, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        if reduction == "none":
            return tensor
        gathered = pipeline.collectives.gather_from_last_modules(torch.utils._pytree.tree_map(
            lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, tensor))  # fmt: skip
        fn = (lambda t: t.sum(0) * scale) if reduction == "sum" else (lambda t: t.mean(0) * scale)
        return torch.utils._pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, gathered)

    _patch(Accelerator, "reduce", reduce)

    gather_object = accelerator_module.gather_object

    @functools.wraps(gather_object)
    def pipeline_gather_object(obj: Any) -> Any:
        pipeline = _active()
        if pipeline is None:
            return gather_object(obj)
        return [item for part in pipeline.collectives.gather_objects_from_last_modules(obj) for item in part]

    accelerator_module.gather_object = pipeline_gather_object

    _patch(PartialState, "wait_for_everyone", lambda pipeline, original, self: pipeline.barrier())

    num_processes = Accelerator.num_processes

    @property  # type: ignore[misc]
    def pipeline_num_processes(self: Any) -> int:
        pipeline = _active()
        if pipeline is not None:
            return pipeline.layout.replicas
        value = num_processes.fget(self)
        if value > 1 and not sys._getframe(1).f_globals.get("__name__", "").startswith("accelerate"):
            _read_before_pipeline[0] = value  # the script's own read, before any wrapper: see warn_if_read_early
        return value

    Accelerator.num_processes = pipeline_num_processes

    unwrap_model = Accelerator.unwrap_model

    @functools.wraps(unwrap_model)
    def unwrap(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        model = unwrap_model(self, model, *args, **kwargs)
        return model.module if isinstance(model, wrapper_class) else model

    Accelerator.unwrap_model = unwrap

    def end_training(pipeline: Any, original: Any, self: Any) -> Any:
        pipeline.close()
        return original(self)

    _patch(Accelerator, "end_training", end_training)


_read_before_pipeline: list[int | None] = [None]  # the last value a script read while no pipeline ran


def warn_if_read_early(replicas: int) -> None:
    """Called when a pipeline starts: a script that read ``accelerator.num_processes`` before (to scale a
    learning-rate schedule, say) got every process, not the D data-parallel replicas it means now."""
    read = _read_before_pipeline[0]
    if read is not None and read != replicas:
        logger.warning(
            "accelerator.num_processes was read as %d before the ReplayModelWrapper was built; with one process "
            "per module it is the number of data-parallel replicas, %d, and the LR scheduler steps %d time(s) per "
            "optimizer step. Anything computed from the earlier value (warm-up or decay lengths) is off by a factor "
            "of %d: build the wrapper right after the model, before reading accelerator.num_processes.",
            read, replicas, replicas, read // replicas,
        )  # fmt: skip
    _read_before_pipeline[0] = None


def _active() -> Any:
    return active_rank()


def _patch(cls: type, name: str, pipelined: Any) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        pipeline = _active()
        if pipeline is None:
            return original(self, *args, **kwargs)
        return pipelined(pipeline, original, self, *args, **kwargs)

    setattr(cls, name, method)
