"""Tiny random-init models of the families users bring, with a batch maker and two loss paths.

Each entry: ``build()`` -> model, ``batch(n, seed)`` -> the keyword (or positional) inputs,
``own_loss(output, batch)`` -> the loss computed outside the model from its logits (the
"compute it yourself" path); for transformers models ``output.loss`` is the in-model path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


@dataclass
class Entry:
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Any]  # (batch size, seed) -> dict of keyword inputs or (x, y)
    own_loss: Callable[[Any, Any], torch.Tensor]
    hf: bool = True
    unlabeled: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # inputs without labels (default: drop them)


def _tokens(n: int, seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _lm_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = _tokens(n, seed, length=8 + seed % 3)  # a new sequence length per batch
    return {"input_ids": ids, "labels": ids}


def _causal_lm_loss(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _classification_loss(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out.logits, batch["labels"])


def _seq2seq_loss(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch["labels"].reshape(-1))


def _shift_right(labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs T5 makes from its labels: start token 0, then the labels shifted right."""
    return torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1)


def _image_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hf(name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        logging.getLogger("transformers").setLevel(logging.ERROR)
        model_class = getattr(transformers, name)
        return model_class(model_class.config_class(**config))

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        if name == "vit":
            return torchvision.models.VisionTransformer(32, 8, 4, 2, 32, 64, num_classes=10)
        return torchvision.models.get_model(name, num_classes=10, **kwargs)

    return build


_GPT2 = dict(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)  # use_cache=True, as pretrained

ZOO: dict[str, Entry] = {
    "bert": Entry(
        _hf("BertForSequenceClassification", num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
            intermediate_size=64, vocab_size=VOCAB, num_labels=3),
        lambda n, seed: {
            "input_ids": _tokens(n, seed),
            "attention_mask": (torch.arange(10) < 10 - seed % 3).long().expand(n, 10).contiguous(),
            "labels": torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed)),
        },
        _classification_loss,
    ),
    "gpt2": Entry(_hf("GPT2LMHeadModel", **_GPT2), _lm_batch, _causal_lm_loss),  # tied embedding <-> head
    "gpt2-untied": Entry(_hf("GPT2LMHeadModel", **_GPT2, tie_word_embeddings=False), _lm_batch, _causal_lm_loss),
    "llama": Entry(
        _hf("LlamaForCausalLM", num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=VOCAB),  # use_cache=True, the default of every pretrained Llama
        _lm_batch,
        _causal_lm_loss,
    ),
    "t5": Entry(
        _hf("T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
            num_decoder_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0),
        lambda n, seed: {"input_ids": _tokens(n, seed), "labels": _tokens(n, seed + 100, length=6)},
        _seq2seq_loss,
        unlabeled=lambda b: {"input_ids": b["input_ids"], "decoder_input_ids": _shift_right(b["labels"])},
    ),
    "vit": Entry(
        _hf("ViTForImageClassification", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=2, intermediate_size=64, num_labels=10),
        lambda n, seed: dict(zip(("pixel_values", "labels"), _image_batch(n, seed))),
        _classification_loss,
    ),
    "tv-resnet18": Entry(_tv("resnet18"), _image_batch, lambda out, b: F.cross_entropy(out, b[1]), hf=False),
    "tv-mobilenet_v3_small": Entry(
        _tv("mobilenet_v3_small"), _image_batch, lambda out, b: F.cross_entropy(out, b[1]), hf=False
    ),
    "tv-vit": Entry(_tv("vit"), _image_batch, lambda out, b: F.cross_entropy(out, b[1]), hf=False),
}  # fmt: skip


def call(model: nn.Module, batch: Any, with_labels: bool = True, entry: Entry | None = None) -> Any:
    """The model's output for a batch: keyword inputs (without ``labels`` if asked), or the image."""
    if not isinstance(batch, dict):
        return model(batch[0])
    if with_labels:
        return model(**batch)
    if entry is not None and entry.unlabeled is not None:
        return model(**entry.unlabeled(batch))
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def loss_of(entry: Entry, out: Any, batch: Any, in_model: bool) -> torch.Tensor:
    return out.loss if in_model else entry.own_loss(out, batch)
