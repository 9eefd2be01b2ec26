"""The wire format between the ranks of a pipeline: what a message is, and its header.

Between two ranks of a pipeline there is one ordered channel per direction (``transport.py``).
Everything one sends the other travels on it, in order: the activations of a training step or
of an evaluation forward, the stale gradient, "step discarded", the tied weights' gradients,
and the *sync* messages of collective points (a barrier, a state dict, a metric, exiting).
Every message starts with a fixed-size header that says what the sender is doing (kind, its
training step, evaluation forward and optimizer step counters, the batch size, and for the
first steps a fingerprint of its batch) and describes the values that follow (tensors by
dtype and shape, numbers and ``None`` inline), so a receiver that expects something else stops
at once with an error naming both sides instead of mixing messages up or waiting forever.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

HEADER_WORDS = 512
_MAGIC = 0x5E71A7
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip
_TENSOR, _NONE, _INT, _FLOAT, _BOOL = 0, 1, 2, 3, 4


class PipelineError(RuntimeError):
    """A neighbour rank failed, stopped answering, or the ranks disagree."""


class Kind(IntEnum):
    """What a message is; its header's first word after the magic number."""

    ACTIVATIONS = 1  # module s -> s+1, training step
    EVAL = 2  # module s -> s+1, evaluation forward
    GRADIENT = 3  # module s -> s-1, the stale gradient of the previous step
    DROPPED = 4  # module s -> s-1, that step was discarded (zero_grad without step): no gradient
    TIED = 5  # a tied parameter's gradient, between the modules that share it
    SYNC = 6  # a collective point; ``op`` says which
    RNG = 7  # module K -> the others, after its training forward: the generator state one process has (rng.py)


class Op(IntEnum):
    """Collective points that all ranks of a pipeline must reach together."""

    BARRIER = 1  # accelerator.wait_for_everyone()
    STATE = 2  # a state dict (model or optimizer: collective)
    METRIC = 3  # a metric summed or gathered from the last modules
    EXIT = 4  # the process is ending


DOING = {
    Kind.ACTIVATIONS: "training (a training-mode forward)",
    Kind.EVAL: "evaluating (a forward in eval mode or under torch.no_grad())",
    Kind.GRADIENT: "finishing a training step (sending its gradient)",
    Kind.DROPPED: "finishing a discarded training step",
    Kind.TIED: "exchanging tied weights' gradients (optimizer.step())",
    Kind.RNG: "training (it ran the last module's forward)",
}
POINTS = {
    Op.BARRIER: "accelerator.wait_for_everyone()",
    Op.STATE: "a state dict (accelerator.save_state / save_model / model.state_dict(): collective)",
    Op.METRIC: "a metric from the last modules (accelerator.gather / reduce / sum_over_last_modules: collective)",
    Op.EXIT: "the end of the script",
}
OPS = {
    Op.BARRIER: "waiting at accelerator.wait_for_everyone()",
    Op.STATE: "collecting a state dict (accelerator.save_state / save_model / model.state_dict())",
    Op.METRIC: "combining a metric from the last modules (accelerator.gather / reduce / sum_over_last_modules)",
    Op.EXIT: "exiting (its script ended)",
}


@dataclass(frozen=True)
class Header:
    kind: Kind
    op: int = 0  # Op for SYNC
    tick: int = 0  # training forwards so far
    evals: int = 0  # evaluation forwards so far
    steps: int = 0  # optimizer steps so far
    batch: int = 0
    fingerprint: float = 0.0  # of the batch, for the first steps (0: not checked)

    def doing(self) -> str:
        if self.kind == Kind.SYNC:
            return OPS.get(Op(self.op), "at a collective point")
        what = DOING[self.kind]
        return f"{what}, at training step {self.tick}, evaluation forward {self.evals}, optimizer step {self.steps}"


def encode(header: Header, values: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A fixed-size int64 header describing ``values``, and the tensors to send after it."""
    words: list[int] = [
        _MAGIC, int(header.kind), int(header.op), header.tick, header.evals, header.steps, header.batch,
        _float_bits(header.fingerprint), len(values),
    ]  # fmt: skip
    tensors = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype not in _DTYPES:
                raise TypeError(f"cannot send a tensor of dtype {v.dtype} between modules")
            words += [_TENSOR, _DTYPES.index(v.dtype), v.dim(), *v.shape]
            tensors.append(v)
        elif v is None:
            words.append(_NONE)
        elif isinstance(v, bool):
            words += [_BOOL, int(v)]
        elif isinstance(v, int):
            words += [_INT, v]
        elif isinstance(v, float):
            words += [_FLOAT, _float_bits(v)]
        else:
            raise TypeError(f"cannot send a {type(v).__name__} between modules; a module may pass tensors, "
                            "None, bool, int and float to the next")  # fmt: skip
    if len(words) > HEADER_WORDS:
        raise ValueError(f"a module passes too many values to the next ({len(values)})")
    return torch.tensor(words + [0] * (HEADER_WORDS - len(words)), dtype=torch.int64), tensors


def decode(words_tensor: torch.Tensor, device: torch.device, peer: int) -> tuple[Header, tuple[Any, ...]]:
    """The header, and empty tensors (to receive into) and plain values, as described by it."""
    words = words_tensor.tolist()
    if words[0] != _MAGIC:
        raise PipelineError(f"a message from rank {peer} is not a replay_opt header: is another library using "
                            "point-to-point messages between the same ranks?")  # fmt: skip
    header = Header(Kind(words[1]), words[2], words[3], words[4], words[5], words[6], _bits_float(words[7]))
    count, i = words[8], 9
    values: list[Any] = []
    for _ in range(count):
        kind = words[i]
        if kind == _TENSOR:
            dtype, ndim = _DTYPES[words[i + 1]], words[i + 2]
            shape = words[i + 3 : i + 3 + ndim]
            values.append(torch.empty(shape, dtype=dtype, device=device))
            i += 3 + ndim
        elif kind == _NONE:
            values.append(None)
            i += 1
        elif kind == _BOOL:
            values.append(bool(words[i + 1]))
            i += 2
        elif kind == _INT:
            values.append(words[i + 1])
            i += 2
        else:
            values.append(_bits_float(words[i + 1]))
            i += 2
    return header, tuple(values)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def fingerprint(tensors: Sequence[Any]) -> float:
    """A number that differs, almost surely, between two different batches (position-weighted sum).

    Only integer inputs count (token ids, labels, masks): floating inputs may be augmented on each
    rank with its own random draws, and only module 1 uses them.
    """
    total = 0.0
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.numel() and not (t.is_floating_point() or t.is_complex()):
            flat = t.detach().reshape(-1).to("cpu", torch.float64)
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(9973).add_(i + 1)
            total += float((flat * weights).sum())
    return total
