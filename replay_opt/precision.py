"""Mixed precision as Accelerate sets it, where the library (not Accelerate) must apply it.

``accelerator.prepare`` leaves a pipeline-parallel model unwrapped (one process per module), so its
autocast and the float32 outputs it gives a bf16 model are applied here; fp16 loss scaling in one
process needs the optimizer to know the scaler, since stale gradients must follow the scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_map_only


def accelerate_precision() -> str:
    """Accelerate's mixed-precision mode; "no" while no Accelerator exists."""
    from accelerate.state import AcceleratorState

    return AcceleratorState().mixed_precision if AcceleratorState._shared_state else "no"


@contextlib.contextmanager
def pipeline_autocast(device_type: str) -> Iterator[str]:
    """Accelerate's autocast for one module per process; yields the mode."""
    mode = accelerate_precision()
    if mode == "fp16":
        raise RuntimeError(
            "fp16 loss scaling is not supported with one process per module (each rank would skip "
            "steps on its own); use bf16"
        )
    if mode == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield mode
    else:
        yield mode


def to_fp32(out: Any) -> Any:
    """Half-precision floating outputs in float32, as Accelerate returns a bf16 model's outputs."""
    return tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t, out)


def check_grad_scaler() -> None:
    """Under fp16 the optimizer must be given the scaler (one process)."""
    if accelerate_precision() == "fp16":
        raise RuntimeError(
            "fp16 training scales the loss, and stale gradients must follow the scale: pass "
            "`ReplayOptimizer(optimizer, model, grad_scaler=accelerator.scaler)`"
        )
