"""transformers' ``Trainer`` with one process per module: its saves take every module's weights, its logs the real loss.

Trainer writes checkpoints and ``save_model`` directories from the main process only: the other
processes return from ``Trainer._save`` and skip the optimizer's state dict.  With one process per
module the main process trains one module, and the model's and optimizer's state dicts are
collective (every rank hands in the module it trains; see ``multiprocess/checkpoints.py``).  So while a
``ReplayModelWrapper`` runs one process per module, the other ranks take part in those two gathers
and write nothing; the main process writes what one process would.  With no pipeline Trainer is
unchanged.  Trainer averages the logged training loss with a raw ``all_gather`` over every process
(``trainer_pt_utils.distributed_concat``), not Accelerate's ``gather``: while a pipeline runs it gathers
the last modules' values (the real losses, one per replica), as ``accelerator.gather`` does.
Installed by the wrapper when ``transformers`` is imported.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..multiprocess.registry import active_rank


@functools.cache
def install() -> None:
    """Patch ``transformers.Trainer`` once (idempotent); every patch defers to Trainer unless a pipeline runs."""
    try:
        import transformers.trainer_pt_utils as pt_utils
        from transformers import Trainer
    except ImportError:  # pragma: no cover - only called when transformers is imported
        return

    save = Trainer._save

    @functools.wraps(save)
    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if _gathering(self) and state_dict is None:
            self.model.state_dict()  # this rank's module, into the main process's state dict
            return None
        return save(self, output_dir, state_dict)

    Trainer._save = _save

    save_optimizer = Trainer._save_optimizer_and_scheduler

    @functools.wraps(save_optimizer)
    def _save_optimizer_and_scheduler(self: Any, output_dir: str) -> None:
        if _gathering(self):
            self.optimizer.state_dict()  # this rank's optimizer and replay state, into the main process's
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler

    concat = pt_utils.distributed_concat

    @functools.wraps(concat)
    def distributed_concat(tensor: Any, num_total_examples: int | None = None) -> Any:
        pipeline = active_rank()
        if pipeline is None:
            return concat(tensor, num_total_examples)
        gathered = pipeline.collectives.gather_from_last_modules(tensor)
        if num_total_examples is None:
            return gathered
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t[:num_total_examples], gathered)

    pt_utils.distributed_concat = distributed_concat


def _gathering(trainer: Any) -> bool:
    """Whether this rank must hand its part to the main process's save (a pipeline runs; it does not write)."""
    return active_rank() is not None and not trainer.args.should_save
