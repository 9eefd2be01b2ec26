"""``ReplayModelWrapper``: line one of two -- cut the model into K modules and place them."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .bypass import Guard, engine_running
from .cut.partition import Balance, Partition, Program, Stage
from .integrations.accelerate import install as install_accelerate
from .integrations.accelerate import warn_if_read_early
from .integrations.peft import peft_class, signature_class
from .integrations.trainer import install as install_trainer
from .integrations.trl import FusedHead, adopt_patched
from .methods import make_method
from .methods.bp import Backprop, GPipe
from .methods.history import to_device
from .multiprocess.checkpoints import FreshStateDict
from .multiprocess.layout import Layout, local_device, pipeline_layout
from .multiprocess.rank import Rank
from .precision import check_grad_scaler, pipeline_autocast, to_fp32

logger = logging.getLogger(__name__)

DeviceLike = torch.device | str | int


class ReplayModelWrapper(nn.Module):
    """Train ``module`` with Features Replay (or another method) across K modules.

    The wrapper trains ``module`` in place, like ``DistributedDataParallel``:
    ``wrapper.module`` is the original object, its parameters are the ones the
    optimizer updates, and ``wrapper.state_dict()`` is the model's state dict
    under the ``module.`` prefix.

    Args:
        module: the model to train.
        num_modules: K, the number of pipeline modules.  Optional when
            ``split_points`` is given.
        method: ``"fr"`` (Features Replay, default), ``"bp"`` (plain
            backpropagation through the same API), ``"gpipe"`` / ``"1f1b"``
            (exact micro-batched pipelining on torch.distributed.pipelining's
            schedules, one process per module), or a baseline: ``"ddg"``,
            ``"dni"``, ``"dgl"`` (see ``docs/methods.md``).
        split_points: K-1 submodule names, as in ``module.named_modules()``, at
            each of which a new pipeline module begins.
        balance: how to choose split points when none are given: ``"params"``
            (equal parameter counts, default), ``"time"`` (equal measured
            forward+backward time; needs ``example_inputs``) or a list of K
            unit counts (see ``wrapper.units``).
        devices: one device per module.  Default: one accelerator per module
            when at least K are visible, else every module stays where the
            model is (and moves with ``.to()`` / ``accelerator.prepare``).
        example_inputs: a batch -- a tuple of positional inputs or a dict of
            keyword inputs (``{"input_ids": ..., "labels": ...}``) -- to capture
            the model now rather than at its first forward; needed for
            ``balance="time"``.
        capture: how models that are not an ``nn.Sequential`` are turned into
            graphs: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or
            ``"export"`` (see ``docs/models.md``).
        track_memory: count the bytes each module holds for backward in every
            training step (see ``memory_report``); off by default because it
            hooks every tensor autograd saves.
        timeout: seconds any wait on another process may take before it is
            declared failed (multi-process mode).
        microbatches: M, the micro-batches of each batch for ``"gpipe"`` /
            ``"1f1b"`` (default 2K; 1F1B needs M >= K).

    Under ``accelerate launch`` / ``torchrun`` with W = K x D processes, rank r
    runs module ``r % K`` of data-parallel replica ``r // K`` (see
    ``multiprocess/rank.py`` for what ``model(x)`` returns on the other ranks).

    In training mode with gradients enabled, ``wrapper(x)`` is one pipeline
    step: pair it with ``loss.backward()`` and ``ReplayOptimizer.step()``.  In
    eval mode, or under ``torch.no_grad()``, it is plain inference and leaves
    the pipeline untouched.

    What libraries inspect on a model, the wrapper presents as the model's own
    (so ``transformers.Trainer`` and Accelerate treat it as the model):

    * ``inspect.signature(wrapper.forward)`` (and of ``type(wrapper).forward``)
      is the model's ``forward`` signature: Trainer keeps the dataset columns
      the model takes and finds its ``label_names`` from it;
    * ``state_dict()`` / ``load_state_dict()`` use the model's own keys (no
      ``module.`` prefix; a prefixed state dict loads too), so a saved state
      dict, ``Trainer.save_model`` and ``save_pretrained`` reload into the bare
      model;
    * any other attribute the wrapper does not have is read from the model
      (``config``, ``name_or_path``, ``main_input_name``, ``generation_config``,
      ``_keys_to_ignore_on_save``, ``floating_point_ops``, ...), as PEFT's
      ``PeftModel`` does;
    * ``hf_device_map`` says where the modules are (set only when they span
      several devices of this process, so that Trainer neither moves the model
      nor wraps it in ``DataParallel``).

    A cache (``use_cache=True`` in a transformers config) is never requested in a
    forward that runs through the cut: ``use_cache=False`` is passed wherever the
    model's ``forward`` takes it.

    A PEFT model is presented as one (``isinstance(wrapper, PeftModel)``, the base
    model's ``forward`` signature; ``integrations/peft.py``); TRL's fused LM head is
    computed on the pipeline's output (``integrations/trl.py``); gradient checkpointing
    recomputes each module in backward (``gradient_checkpointing_enable``); and the
    model's modules train through the wrapper only (``bypass.py``).
    """

    def __new__(cls, module: Any = None, *args: Any, **kwargs: Any) -> ReplayModelWrapper:
        # One subclass per model class, whose ``forward`` shows the model's signature: libraries
        # read it from the class (transformers' ``find_labels(type(model))``), not only from the object.
        if cls is ReplayModelWrapper and isinstance(module, nn.Module):
            cls = _presenting(type(module), signature_class(module), peft_class(module))
        return super().__new__(cls)

    def __init__(
        self,
        module: nn.Module,
        *,
        num_modules: int | None = None,
        method: str = "fr",
        split_points: Sequence[str] | None = None,
        balance: Balance = "params",
        devices: Sequence[DeviceLike] | None = None,
        example_inputs: Any = None,
        capture: str = "auto",
        track_memory: bool = False,
        timeout: float = 300.0,
        microbatches: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"ReplayModelWrapper wraps an nn.Module, got {type(module).__name__}")
        if isinstance(module, ReplayModelWrapper):
            raise TypeError("the model is already a ReplayModelWrapper; wrap the original model once")
        if isinstance(split_points, str):
            raise TypeError(f"split_points takes a list of names, e.g. [{split_points!r}]")
        self.module = module
        self.method: str = method
        self.replay_optimizer: Any = None  # the ReplayOptimizer bound to this model (``bind_optimizer``)
        layout = pipeline_layout(num_modules if num_modules is not None else len(split_points or ()) + 1, timeout)
        if layout is not None and devices is not None:
            raise ValueError(
                "devices= cannot be combined with one process per module: each process runs its module on "
                "its own device (Accelerate's / LOCAL_RANK's); drop devices="
            )
        # The engine's parts, each a plain attribute (not a submodule: the stages share their layers with
        # ``module`` and must not appear twice in parameters() or state_dict()):
        # ``partition`` the cut (cut/), ``algorithm`` the method (methods/), ``rank`` this process's module of a
        # multi-process pipeline (multiprocess/; None in one process).
        with engine_running():  # (capturing and profiling run the model)
            self.partition = Partition(
                module, num_modules=num_modules, split_points=split_points, balance=balance,
                example_inputs=example_inputs, capture=capture,
            )  # fmt: skip
        self._stages: list[Stage] = self.partition.stages
        self.algorithm = make_method(method, self._stages)
        _set_microbatches(self.algorithm, microbatches, layout is not None)
        self.rank: Rank | None = None
        if layout is None:
            self._devices = _resolve_devices(devices, len(self._stages))
            if self._devices is not None:
                for stage, device in zip(self._stages, self._devices):
                    stage.device = device
        else:
            device = local_device()
            self._devices = [device] * len(self._stages)
            self.rank = Rank(
                stages=self._stages, method=self.algorithm, layout=layout, device=device, timeout=timeout, model=module
            )
            # Tell accelerator.prepare to leave this model alone: no move to one device, no DDP
            # (replicas average their gradients themselves, per module).
            self._is_accelerate_prepared = True
            # Whoever asks the model for its state dict gets every module's current weights.
            module._register_state_dict_hook(FreshStateDict(self.rank))
            if layout.rank == 0:
                print(layout.describe(), flush=True)
        # unwrap_model gives the wrapped model; with a pipeline, Accelerate's idioms act on it
        install_accelerate(ReplayModelWrapper)
        if layout is not None:
            warn_if_read_early(layout.replicas)
            if "transformers" in sys.modules:
                install_trainer()  # Trainer saves from the main process only; the other modules' ranks join in
        self.partition.on_new_program = self._place
        for program in self.partition.programs():
            self._place(program)
        self.track_memory = track_memory
        self._fused_head: FusedHead | None = None  # TRL's fused LM head, adopted (integrations/trl.py)
        self._training_forwards = 0  # since the last optimizer step (bypass.py)
        self._guard = Guard(module, method)  # the model's modules train through this wrapper only

    def _place(self, program: Program) -> None:
        """Put a new program's stage modules on their devices (one process per module: this rank's only)."""
        if self.rank is not None:
            self.rank.on_new_program(program, self.split_points)
        elif self._devices is not None:
            for stage, module in zip(self._stages, program.stages):
                module.to(stage.device)
        if self.replay_optimizer is not None:
            self.replay_optimizer.on_new_program()

    # ----------------------------------------------------------------------- public

    @property
    def num_modules(self) -> int:
        return len(self._stages)

    @property
    def split_points(self) -> list[str]:
        """The K-1 submodule names at which modules 2..K begin ([] until chosen at the first forward)."""
        return list(self.partition.split_points or [])

    @property
    def units(self) -> list[str]:
        """The submodule names the balancer may cut at (in execution order once the model is captured)."""
        return list(self.partition.ordered_units or self.partition.units)

    @property
    def stages(self) -> list[nn.Module]:
        """The K pipeline modules (train-mode graphs), sharing their layers with ``self.module``."""
        return [s.train for s in self._stages]

    @property
    def devices(self) -> list[torch.device]:
        self._sync_devices()
        return [s.device for s in self._stages]

    @property
    def track_memory(self) -> bool:
        return self.algorithm.meter.enabled

    @track_memory.setter
    def track_memory(self, enabled: bool) -> None:
        self.algorithm.meter.enabled = bool(enabled)

    def memory_report(self) -> dict[str, Any]:
        """Bytes held for backward in the last training step, per module and category.

        Keys: ``modules`` (one dict per module with ``activations``,
        ``retained_graphs``, ``history``, ``stale_gradients``, ``total``), the same
        categories summed over modules, ``total``, and
        ``cuda_max_memory_allocated`` per CUDA device holding a module.
        """
        if not self.track_memory:
            raise RuntimeError("memory accounting is off: build the wrapper with track_memory=True")
        self.algorithm.meter.devices = self.devices
        return {"method": self.method, **self.algorithm.meter.report()}

    def describe(self) -> str:
        """A table of the partition: where each module begins, its parameters and device."""
        lines = [f"{type(self.module).__name__} -> {self.num_modules} modules, method={self.method!r}"]
        layout = self.layout
        for stage, device in zip(self._stages, self.devices):
            where = f"on {device}" if layout is None else f"on rank {layout.rank_of(stage.index)}"
            if not self.partition.captured:
                lines.append(f"  module {stage.index + 1}: split and captured at the first forward  {where}")
                continue
            params = sum(p.numel() for p in stage.parameters())
            first = self.split_points[stage.index - 1] if stage.index else "(input)"
            lines.append(f"  module {stage.index + 1}: from {first:<24} {params:>12,} params  {where}")
        for program in self.partition.programs():
            if program.graph is not None:
                lines.append(f"  captured with {program.graph.tracer} in {program.graph.seconds:.2f} s: {program.name}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"num_modules={self.num_modules}, method={self.method!r}, split_points={self.split_points}"

    # ----------------------------------------------------------------------- the model's face

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__") or name in _NOT_FORWARDED:
                raise
            return getattr(module, name)  # the model's attribute: config, name_or_path, generation_config, ...

    def __setattr__(self, name: str, value: Any) -> None:
        head = FusedHead.of(value) if name == "forward" else None
        if head is not None:  # TRL's add_fused_lm_head(model): computed on the pipeline's output (integrations/trl.py)
            self._fused_head = head
            return
        if name == "peft_config":  # PEFT's tuner, done injecting adapters into the model inside this wrapper
            raise ValueError(ADAPTERS_AROUND)
        super().__setattr__(name, value)

    @property
    def hf_device_map(self) -> dict[str, str]:
        """Where each module runs, as transformers' ``hf_device_map`` (first unit -> device) -- only when this
        process spreads the modules over several devices; otherwise there is none (an AttributeError, as for a
        model on one device: Accelerate and Trainer test ``hasattr``)."""
        if self._devices is None or self.rank is not None or len(set(self._devices)) < 2:
            raise AttributeError("hf_device_map")
        split_points = self.split_points
        names = ["(input)", *split_points] if split_points else [f"module {i + 1}" for i in range(self.num_modules)]
        return {name: str(device) for name, device in zip(names, self._devices)}

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
        *,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Recompute activations in backward instead of keeping them: transformers' ``gradient_checkpointing_enable``
        / ``TrainingArguments(gradient_checkpointing=True)``, per pipeline module (``cut/partition.py``,
        ``Checkpointing``): each module's forward that builds a graph keeps only its inputs, and backward runs it
        again, with the same random draws.  ``every_n_layers=n`` checkpoints modules 1, 1+n, ...;
        ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint`` (always non-reentrant: the modules'
        inputs need not require gradients)."""
        if self.method == "ddg":
            raise ValueError(
                "method='ddg' back-propagates each module's graph one step later, after optimizer.step(): "
                "checkpointing would recompute it at the new weights, which is not DDG. Drop activation/gradient "
                "checkpointing (gradient_checkpointing=False), or use method='fr', whose replay recomputes by design"
            )
        if offload:
            raise ValueError(
                "offload=True (activation offloading) is not supported inside a ReplayModelWrapper; drop it "
                "(activation_checkpointing_kwargs={'offload': False}) -- checkpointing alone still applies"
            )
        options = dict(activation_checkpointing_kwargs or gradient_checkpointing_kwargs or {})
        self.partition.checkpoint(every=every_n_layers, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:  # fmt: skip
        """transformers' older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.partition.checkpoint(every=0)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.partition.checkpointing is not None

    is_activation_checkpointing = is_gradient_checkpointing

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own ``generate``, in one process; with one process per module this rank holds one module's
        current weights only, so generation is refused rather than run on stale ones."""
        if self.rank is not None:
            raise RuntimeError(
                "generate() needs the whole model in one process, but this rank trains one module of a pipeline. "
                "Save the model (trainer.save_model() / unwrap_model(model).save_pretrained(dir), on every rank) and "
                "generate from AutoModel*.from_pretrained(dir) in one process; for evaluation use the loss "
                "(predict_with_generate=False)"
            )
        return self.module.generate(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The model's own state dict (its keys, no ``module.`` prefix); collective with one process per module."""
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the model's state dict (its own keys, or with the ``module.`` prefix of a DDP-style save)."""
        if state_dict and all(k.startswith("module.") for k in state_dict) and not hasattr(self.module, "module"):
            stripped = OrderedDict((k.removeprefix("module."), v) for k, v in state_dict.items())
            metadata = getattr(state_dict, "_metadata", None)
            if metadata is not None:
                stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
                    ("" if k == "module" else k.removeprefix("module."), v) for k, v in metadata.items()
                )
            state_dict = stripped
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    # ----------------------------------------------------------------------- forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "fused_lm_head" in kwargs:
            return self._fused_forward(args, kwargs)
        with engine_running():
            return self._forward(args, kwargs)

    def _fused_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``model(..., fused_lm_head=True)``, as TRL's trainers call it: the model through the cut, then the adopted
        head on the logits of the last module (``integrations/trl.py``)."""
        kwargs = dict(kwargs)
        fused = kwargs.pop("fused_lm_head")
        head = self._fused_head = self._fused_head or adopt_patched(self.module)
        # (ReplayModelWrapper.forward, not self.forward: this call came through any wrapper put on self.forward --
        # Accelerate's autocast, say, whose context object must not be entered twice)
        if not fused:
            return ReplayModelWrapper.forward(self, *args, **kwargs)
        if head is None:
            raise ValueError(
                "fused_lm_head=True, but no fused LM head was added to this model: call "
                "trl.trainer.utils.add_fused_lm_head(model) first (TRL's trainers do), or drop fused_lm_head"
            )
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        count = kwargs.pop("num_items_in_batch", None)
        out = ReplayModelWrapper.forward(self, *args, **kwargs)
        aux = getattr(out, "aux_loss", None) if kwargs.get("output_router_logits") else None
        coef = getattr(getattr(self.module, "config", None), "router_aux_loss_coef", 0.0)
        return head(out.logits, labels, shift_labels, count, aux, coef)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._sync_devices()
        training = self.training and torch.is_grad_enabled()
        if not (training or self.rank is not None or self._devices is not None):
            return self.module(*args, **kwargs)  # inference on one device: the original forward, exactly
        call = self.partition.bind(args, kwargs)  # the one object that goes through the cut
        if training:
            if self.replay_optimizer is None and not isinstance(self.algorithm, Backprop):
                raise RuntimeError(
                    "no ReplayOptimizer is bound to this model: wrap the optimizer with "
                    "`optimizer = ReplayOptimizer(optimizer, model)` before training"
                )
            self._check_grad_scaler()
            self._training_forwards += 1
            self.algorithm.meter.begin_step()
            if self.replay_optimizer is not None:
                self.replay_optimizer.before_forward()
        if self.rank is not None:
            with pipeline_autocast(self.rank.device.type) as precision:
                self.partition.select(call, training)
                out = self.rank.train_forward(call) if training else self.rank.infer(call, self.training)
            return to_fp32(out) if precision == "bf16" else out
        self.partition.select(call, self.training)  # (in train mode under no_grad: the train-mode program)
        if training:
            out = self.algorithm.forward(call.inputs)
        else:  # modules on several devices of this process
            x = call.inputs
            for stage in self._stages:
                x = stage.forward(False, *to_device(x, stage.device))
            out = x
        return self._to_input_device(out, call)

    # ----------------------------------------------------------------------- multi-process

    @property
    def layout(self) -> Layout | None:
        """Which rank runs which module (None in one process)."""
        return None if self.rank is None else self.rank.layout

    def sum_over_last_modules(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel replicas of ``value`` as computed on each replica's last module.

        The loss and accuracy are only meaningful on the rank of the last module; every rank
        calls this at the same point and gets the same result.  In one process: ``value``.
        """
        return value if self.rank is None else self.rank.collectives.sum_over_last_modules(value)

    def prepare_data_loader(self, loader: Any, **kwargs: Any) -> Any:
        """``accelerate``'s ``prepare_data_loader``, sharded over data-parallel replicas, not ranks.

        All ranks of one pipeline must see the same batches (module 1 needs the inputs, the
        last module the targets); ``accelerator.prepare(loader)`` would give each rank its own.
        """
        from accelerate.data_loader import prepare_data_loader

        layout = self.layout
        kwargs.setdefault("use_seedable_sampler", True)
        return prepare_data_loader(
            loader,
            device=self.devices[0 if layout is None else layout.stage],
            num_processes=1 if layout is None else layout.replicas,
            process_index=0 if layout is None else layout.replica,
            put_on_device=True,
            **kwargs,
        )

    def bind_optimizer(self, optimizer: Any) -> None:
        """Called by ``ReplayOptimizer``: the one optimizer of this model (told of new programs, asked to
        predict weights before each training forward)."""
        if self.replay_optimizer is not None:
            raise ValueError("this ReplayModelWrapper already has a ReplayOptimizer; create one per model")
        self.replay_optimizer = optimizer

    def take_training_forwards(self) -> int:
        """Training forwards since the last call (``ReplayOptimizer.step()``: were this step's gradients ours?)."""
        count, self._training_forwards = self._training_forwards, 0
        return count

    def local_parameters(self) -> list[nn.Parameter]:
        """The parameters this process trains: every module's in one process, its own module's with one process
        per module."""
        return self.rank.stage.parameters() if self.rank is not None else list(self.module.parameters())

    def _to_input_device(self, out: Any, call: Any) -> Any:
        # The output goes back to where the batch came from, so the user's loss
        # meets its targets on one device, as with a model on one device.
        if self._devices is None:
            return out
        device = next((t.device for t in call.tensors), None)
        if device is None:
            return out
        return tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), out)

    def _sync_devices(self) -> None:
        if self._devices is None:  # every module lives where the model lives
            device = next(self.module.parameters(), next(self.module.buffers(), torch.empty(0))).device
            for stage in self._stages:
                stage.device = device

    def _check_grad_scaler(self) -> None:
        # With one process per module fp16 is refused outright (see pipeline_autocast), not scaled.
        if self.algorithm.grad_scaler is None and self.rank is None:
            check_grad_scaler()

    # ----------------------------------------------------------------------- placement

    def to(self, *args: Any, **kwargs: Any) -> ReplayModelWrapper:
        """Like ``nn.Module.to``, except that an explicit per-module placement is kept.

        ``accelerator.prepare`` moves models to its one device; with modules
        spread over several devices only a dtype change is applied.
        """
        if self._devices is None:
            return super().to(*args, **kwargs)
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            logger.info("keeping the per-module placement %s (ignoring .to(%s))", self._devices, device)
        if dtype is not None:
            super().to(dtype=dtype, non_blocking=non_blocking)
        return self

    # ----------------------------------------------------------------------- replay state

    def replay_state_dict(self) -> dict[str, Any]:
        """What the method keeps between steps (histories, stale gradients, counters), and the cut."""
        return {**self.algorithm.state_dict(), "split_points": self.split_points}

    def load_replay_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("split_points")
        same_shape = state.get("method") == self.method and state.get("num_modules") == self.num_modules
        if same_shape and saved is not None and self.partition.split_points is not None and saved != self.split_points:
            raise ValueError(
                f"the checkpoint was saved with split_points={saved}, this model is cut at {self.split_points}: the "
                "stored inputs and gradients belong to the other cut; build the wrapper with "
                f"split_points={saved} to resume"
            )
        self._sync_devices()
        self.algorithm.load_state_dict(state)


ADAPTERS_AROUND = (
    "PEFT is adding adapters around a ReplayModelWrapper (get_peft_model(wrapper, ...), or a trainer's "
    "peft_config=): the wrapper would run the modules it captured and the optimizer you built holds none of the "
    "adapters. Apply PEFT first and wrap the PEFT model: model = get_peft_model(model, LoraConfig(...)); "
    "model = ReplayModelWrapper(model, ...); optimizer = ReplayOptimizer(optimizer_over_the_adapters, model) -- "
    "and drop peft_config= from the trainer"
)

# Attributes the wrapper must not take from the model: its own (set or looked up before they exist), and those
# whose model value would be wrong for the wrapper (it is not a DDP or compiled module, nor sharded at load time).
_NOT_FORWARDED = frozenset({
    "module", "replay_optimizer", "partition", "_stages", "algorithm", "rank", "_devices",
    "_is_accelerate_prepared", "is_distributed_loading_by_transformers", "_orig_mod", "hf_device_map",
    "_fused_head", "_training_forwards", "_guard",
})  # fmt: skip


@functools.cache
def _presenting(model_class: type[nn.Module], shown: type, peft: type | None) -> type[ReplayModelWrapper]:
    """``ReplayModelWrapper`` for ``model_class``: its ``forward`` shows the ``forward`` signature of ``shown`` (the
    model's class; a PEFT model's base model's), and for a PEFT model (``peft``, its class) it answers
    ``isinstance(wrapper, PeftModel)`` as the libraries that treat PEFT models apart expect
    (``integrations/peft.py``)."""
    try:
        signature: inspect.Signature | None = inspect.signature(shown.forward)
    except (TypeError, ValueError):
        signature = None
    if signature is None and peft is None:
        return ReplayModelWrapper

    def forward(self: ReplayModelWrapper, *args: Any, **kwargs: Any) -> Any:
        return ReplayModelWrapper.forward(self, *args, **kwargs)

    namespace: dict[str, Any] = {"forward": forward, "__module__": __name__}
    if signature is not None:
        forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = model_class.forward.__doc__
    forward.__qualname__ = "ReplayModelWrapper.forward"
    name = f"ReplayModelWrapper[{model_class.__name__}]"
    if peft is not None:
        namespace["__class__"] = property(lambda self: peft)  # isinstance(wrapper, PeftModel); type() stays ours
        namespace["_get_name"] = lambda self: name  # (repr)
    namespace["__qualname__"] = name
    return type(name, (ReplayModelWrapper,), namespace)


def _set_microbatches(method: Any, microbatches: int | None, one_process_per_module: bool) -> None:
    k = len(method.stages)
    if not isinstance(method, GPipe):
        if microbatches is not None:
            raise ValueError(
                f"microbatches= is for method='gpipe' or '1f1b' (method={method.name!r} takes whole batches)"
            )
        return
    m = 2 * k if microbatches is None else microbatches
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if method.name == "1f1b" and m < k:
        raise ValueError(
            f"method='1f1b' needs microbatches >= num_modules ({k}), got {m}; pass microbatches={k} or more"
        )
    if not one_process_per_module or k < 2:
        raise ValueError(
            f"method={method.name!r} pipelines micro-batches across processes with torch.distributed.pipelining: "
            f"launch one process per module (e.g. `accelerate launch --num_processes {max(k, 2)} ...` with "
            f"num_modules={max(k, 2)}); in one process use method='bp'"
        )
    method.microbatches = m


def _resolve_devices(devices: Sequence[DeviceLike] | None, k: int) -> list[torch.device] | None:
    if devices is None:
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if accelerator is not None and k > 1 and torch.accelerator.device_count() >= k:
            return [torch.device(accelerator.type, i) for i in range(k)]
        return None
    if isinstance(devices, (str, int, torch.device)):
        raise TypeError(f"devices takes one device per module, e.g. [{devices!r}] * {k}")
    resolved = [torch.device(d) for d in devices]
    if len(resolved) != k:
        raise ValueError(f"devices lists {len(resolved)} devices for {k} modules; give exactly one per module")
    return resolved
