"""PEFT: what a wrapped ``PeftModel`` (``get_peft_model(model, LoraConfig(...))``) shows the libraries around it.

Trainer, TRL and Accelerate treat a PEFT model apart from a plain one, by ``isinstance(model, PeftModel)``:
they read the dataset columns from the *base* model's ``forward`` (``PeftModel.forward`` takes
``*args, **kwargs``), save and reload the adapter only (``save_pretrained`` / ``load_adapter``), and patch
the base model (``get_base_model()``).  A ``ReplayModelWrapper`` around a PEFT model presents the same:
its class answers ``isinstance(wrapper, PeftModel)``, its ``forward`` signature is the base model's, and the
rest (``get_base_model``, ``peft_config``, ``save_pretrained``, ``load_adapter``, ...) is the PEFT model's own,
read through the wrapper.  The pipeline itself runs the PEFT model's ``forward`` -- adapters included.

Nothing here imports peft: a model is a PEFT model when peft is imported and it is one.
"""

from __future__ import annotations

import sys

from torch import nn


def peft_class(model: nn.Module) -> type | None:
    """``model``'s class when it is a PEFT model (``peft.PeftModel`` or ``PeftMixedModel``), else None."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    classes = tuple(c for c in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None)) if c)
    return type(model) if classes and isinstance(model, classes) else None


def base_model(model: nn.Module) -> nn.Module | None:
    """The transformers model under a PEFT model's adapters (None for any other model)."""
    if peft_class(model) is None:
        return None
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model.base_model.model


def signature_class(model: nn.Module) -> type:
    """The class whose ``forward`` signature libraries should see for ``model``: the base model's for a PEFT model."""
    base = base_model(model)
    return type(base) if base is not None else type(model)

