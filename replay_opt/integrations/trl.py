"""TRL's fused LM head, computed on the pipeline's output.

``SFTTrainer`` (and the trainers built like it) call ``trl.trainer.utils.add_fused_lm_head(model)``, which
replaces ``model.forward`` -- on the wrapper, or on a PEFT model's base model -- with a forward that, given
``fused_lm_head=True``, runs ``model.base_model`` and projects through ``model.get_output_embeddings()``
itself.  On a ``ReplayModelWrapper`` that forward would run the whole backbone around the pipeline: plain
backprop under another method's name.  So the wrapper *adopts* the head instead: it keeps the patch's
settings (temperature, logit scale, soft-capping, the per-token fields asked for), leaves its own forward
(and the model's) as they were, and answers ``model(..., fused_lm_head=True)`` itself: the model runs
through the cut as always -- the last module computes the logits -- and ``FusedHead`` turns them into the
``FusedCausalLMOutput`` TRL reads (``loss``, ``log_probs``, ``entropy``, ``is_top1``, ``label_mask``, ...),
with the arithmetic of TRL's chunked kernel (``trl/kernels/chunked_logprob.py``).

What the pipeline does not give is the kernel's memory saving: the last module materialises the logits,
as the model's own forward does.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_FUSED = "_fused_forward"  # the code's own name (functools.wraps gives the function the model's names)
_SETTINGS = ("temperature", "final_logit_softcapping", "logit_scale", "outputs", "cast_lm_head_to_fp32")


@dataclass
class FusedHead:
    """The settings of one ``add_fused_lm_head`` patch, and the output type it returns."""

    temperature: float
    final_logit_softcapping: float | None
    logit_scale: float
    outputs: tuple[str, ...]
    cast_lm_head_to_fp32: bool
    output_type: Any

    @classmethod
    def of(cls, forward: Any) -> FusedHead | None:
        """The head a patched ``forward`` (a bound method) computes, or None when it is not TRL's fused head."""
        function = getattr(forward, "__func__", forward)
        if not isinstance(function, types.FunctionType) or function.__code__.co_name != _FUSED:
            return None
        if "trl" not in function.__code__.co_filename.replace("\\", "/").split("/"):
            return None
        cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
        missing = [name for name in _SETTINGS if name not in cells]
        output_type = function.__globals__.get("FusedCausalLMOutput")
        if missing or output_type is None:
            raise NotImplementedError(
                f"this version of TRL's add_fused_lm_head keeps no {', '.join(missing) or 'FusedCausalLMOutput'}; "
                "replay_opt cannot compute its head through the pipeline. Pin trl to a release replay_opt supports "
                "(see docs/trainer.md), or train without the fused head"
            )
        settings = {name: cells[name].cell_contents for name in _SETTINGS}
        return cls(**settings, output_type=output_type)

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        aux_loss: torch.Tensor | None = None,
        aux_loss_coef: float = 0.0,
    ) -> Any:
        """TRL's ``FusedCausalLMOutput`` for the model's ``logits`` and the batch's labels."""
        if shift_labels is not None:
            targets = shift_labels
        elif labels is not None:
            logits, targets = logits[:, :-1], labels[:, 1:]
        else:
            raise ValueError("fused_lm_head=True needs labels= (or shift_labels=), as TRL's fused head does")
        targets = targets.to(logits.device)
        mask = targets != -100
        z = logits.float() * self.logit_scale  # (the kernel computes in float32)
        if self.final_logit_softcapping is not None:
            z = self.final_logit_softcapping * torch.tanh(z / self.final_logit_softcapping)
        z = z / self.temperature
        log_z = torch.logsumexp(z, dim=-1)
        index = targets.clamp(min=0).unsqueeze(-1)
        target_z = z.gather(-1, index).squeeze(-1)
        fields: dict[str, torch.Tensor | None] = {"log_probs": target_z - log_z}
        if "entropy" in self.outputs:
            fields["entropy"] = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
        if "log_sum_sq_probs" in self.outputs:
            fields["log_sum_sq_probs"] = torch.logsumexp(2 * (z - log_z.unsqueeze(-1)), dim=-1)
        if "mean_logits" in self.outputs:
            fields["mean_logits"] = z.mean(-1)
        if "is_top1" in self.outputs:  # the first maximum, as argmax: a tie with an earlier token does not count
            fields["is_top1"] = z.argmax(-1) == index.squeeze(-1)
        fields = {k: None if v is None else v.masked_fill(~mask, 0) for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -fields["log_probs"].sum() / count  # type: ignore[union-attr]
        if aux_loss is not None:  # MoE models asked for router logits: their load-balancing loss, as TRL adds it
            loss = loss + aux_loss_coef * aux_loss
        return self.output_type(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)


def adopt_patched(model: nn.Module) -> FusedHead | None:
    """Find a fused head patched onto ``model`` or a submodule (a PEFT model's base model, say), undo the patch
    (the class's ``forward`` is what the patch calls without ``fused_lm_head``) and return its head."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        head = FusedHead.of(forward) if forward is not None else None
        if head is not None:
            del module.forward
            return head
    return None
