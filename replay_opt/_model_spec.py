"""What ``python -m replay_opt.plan --model SPEC`` can plan: any model, named from the command line.

* ``package.module:function`` or ``path/to/file.py:function`` -- ``function()`` returns the model
  (``recipes.models:resnet110`` in this repository);
* ``torchvision:NAME`` / ``timm:NAME`` -- randomly initialised, with ``num_classes``;
* a transformers model directory (``save_pretrained``) or its ``config.json`` -- the class its
  config names (``architectures``; else ``AutoModelForCausalLM``), randomly initialised from the
  config (timing needs no weights).

``example_inputs`` makes a batch the model takes: token ids (and labels, where the model computes
its loss) for a transformers model, random images of ``input_shape`` otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMS = (
    "package.module:function, path/to/file.py:function, torchvision:NAME, timm:NAME, or a transformers model "
    "directory / config.json"
)


def load_model(spec: str, num_classes: int = 10) -> nn.Module:
    """The model ``spec`` names (see the module docstring)."""
    path = Path(spec)
    if path.name == "config.json" or (path.is_dir() and (path / "config.json").exists()):
        return _transformers_model(path if path.is_dir() else path.parent)
    kind, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--model {spec!r}: name a model as {FORMS}")
    if kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(kind).stem, kind)
        if loaded is None or loaded.loader is None:
            raise ValueError(f"--model {spec!r}: cannot load {kind}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(kind)
    model = getattr(module, name)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec!r}: {name}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _transformers_model(directory: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def example_inputs(
    model: nn.Module, batch_size: int, input_shape: tuple[int, ...] = (3, 32, 32), seq_len: int = 128
) -> Any:
    """A random batch ``model`` takes: a dict of keyword inputs for a transformers model, else ``(images,)``."""
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        return (torch.randn(batch_size, *input_shape, device=device),)
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    batch: dict[str, Any] = {"input_ids": ids}
    takes = inspect.signature(model.forward).parameters
    name = type(model).__name__
    if "labels" in takes and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        batch["labels"] = ids
    elif "labels" in takes and name.endswith("ForSequenceClassification"):
        batch["labels"] = torch.randint(0, config.num_labels, (batch_size,), device=device)
    return batch
