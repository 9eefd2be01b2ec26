"""What ``model(x)`` returns on a rank without the last module: zeros shaped like the real output.

Zeros with exactly the structure, shapes and dtypes of the real output (``ModelOutput`` with a
scalar ``loss``, say), found by running the model on fake tensors, once per input shape and mode.
The rank wires them so that ``loss.backward()`` runs this rank's backward.  Values computed from
them are placeholders; the real ones live on the last module's rank.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..cut.capture import Call


class Placeholders:
    """Output-shaped zeros for the calls of ``model`` on ``device``, the structure found once per call shape."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._shapes: dict[Hashable, tuple[list[Any], Any]] = {}

    def __call__(self, call: Call, requires_grad: bool) -> Any:
        """Zeros shaped exactly like the model's output for this call (it runs elsewhere)."""
        key = (self.model.training, call.shape_key())
        if key not in self._shapes:
            self._shapes[key] = output_structure(self.model, call)
        metas, out_spec = self._shapes[key]
        values = [
            torch.zeros(m[0], dtype=m[1], device=self.device).requires_grad_(
                requires_grad and (m[1].is_floating_point or m[1].is_complex)
            )
            if isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], torch.dtype)
            else m
            for m in metas
        ]
        return tree_unflatten(values, out_spec)


def output_structure(model: torch.nn.Module, call: Call) -> tuple[list[Any], Any]:
    """The model's output on this call -- structure, shapes, dtypes -- from a forward on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=False), torch.no_grad():
        state = {n: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for n, t in named_tensors(model)}
        fake_args, fake_kwargs = tree_map(
            lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v,
            (call.args, call.kwargs),
        )
        out = functional_call(model, state, fake_args, fake_kwargs, tie_weights=False, strict=False)
    leaves, spec = tree_flatten(out)
    return [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in leaves], spec


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name (tied ones repeated)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
