"""transformers' ``Trainer`` driving a tiny model, the way its example scripts do it, plain or with the two lines.

``prepare(root)`` writes what a user of ``run_clm.py`` / ``run_classification.py`` starts from: a text file
and a csv file of real text (Python's own docstrings), a tokenizer trained on them with the ``tokenizers``
library, and model directories written by ``save_pretrained`` from tiny random-init configs whose defaults
are left alone (``use_cache=True``, dropout on).  ``train(...)`` then follows the scripts: ``load_dataset``
on the local files, ``AutoTokenizer`` / ``AutoModelFor*.from_pretrained``, tokenize (and group texts),
``Trainer(..., data_collator=default_data_collator, compute_metrics=..., preprocess_logits_for_metrics=...)``,
``train(resume_from_checkpoint=...)``, ``evaluate()``, ``save_model()``.  ``method=None`` is the unmodified
script; otherwise the two lines are added and nothing else changes.

Runs in this process (pytest) or on every rank of a ``tests/cluster.py`` cluster (``accelerate launch`` /
``torchrun`` running the script once per process).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import torch

MODELS = ("gpt2", "llama", "bert")
BLOCK = 16


def prepare(root: str) -> None:
    """The local files: text (train/validation), csv (sentence, label), tokenizer, one directory per model."""
    import collections
    import fractions

    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out = Path(root)
    docs = [textwrap.dedent(o.__doc__).strip() for o in (json, math, textwrap, collections.OrderedDict,
                                                         fractions.Fraction, Path, inspect.signature)]  # fmt: skip
    (out / "train.txt").write_text("\n".join(docs[:-2]))
    (out / "validation.txt").write_text("\n".join(docs[-2:]))
    lines = [line.strip() for d in docs for line in d.splitlines() if len(line.split()) >= 3]
    for name, part in (("train", lines[:48]), ("validation", lines[48:64])):
        rows = ["sentence,label"] + [f'"{line.replace(chr(34), "")}",{len(line.split()) % 3}' for line in part]
        (out / f"{name}.csv").write_text("\n".join(rows) + "\n")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=40))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=160, special_tokens=["[UNK]", "[PAD]"]))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    vocab = len(tokenizer)
    torch.manual_seed(0)
    gpt2 = tf.GPT2Config(
        n_layer=4, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0
    )  # tied embeddings; use_cache=True
    llama = tf.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )  # rotary embeddings; use_cache=True
    bert = tf.BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=vocab, num_labels=3, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    configs = {
        "gpt2": (tf.GPT2LMHeadModel, gpt2),
        "llama": (tf.LlamaForCausalLM, llama),
        "bert": (tf.BertForSequenceClassification, bert),
    }
    for name, (model_class, config) in configs.items():
        model_class(config).save_pretrained(str(out / name))


def train(
    root: str,
    out: str,
    *,
    model: str = "gpt2",
    method: str | None = None,
    modules: int = 2,
    max_steps: int = 6,
    accumulation: int = 1,
    max_grad_norm: float = 1.0,
    save_steps: int | None = None,
    resume: str | None = None,
    save_model: bool = True,
    dropout: bool = True,
    report_to: str = "none",
    bf16: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """One run of the script; returns what it logged, its metrics and the trained weights (on every rank)."""
    import datasets
    import transformers
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bar()
    transformers.set_seed(seed)
    src = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
    lm = model != "bert"
    overrides = {} if dropout else (
        {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model == "gpt2"
        else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if model == "bert" else {}
    )  # fmt: skip
    if lm:  # run_clm.py
        raw = datasets.load_dataset("text", data_files={s: str(src / f"{s}.txt") for s in ("train", "validation")})
        tokenized = raw.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns=["text"])

        def group_texts(examples: dict[str, list]) -> dict[str, list]:
            concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
            total = len(concatenated["input_ids"]) // BLOCK * BLOCK
            result = {k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        data = tokenized.map(group_texts, batched=True)
        net = transformers.AutoModelForCausalLM.from_pretrained(str(src / model), **overrides)

        def preprocess_logits_for_metrics(logits: Any, labels: Any) -> Any:
            if isinstance(logits, tuple):
                logits = logits[0]
            return logits.argmax(dim=-1)

        def compute_metrics(eval_preds: Any) -> dict[str, float]:
            preds, labels = eval_preds
            labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
            return {"accuracy": float((preds == labels).mean())}
    else:  # run_classification.py
        raw = datasets.load_dataset("csv", data_files={s: str(src / f"{s}.csv") for s in ("train", "validation")})
        # The "sentence" column stays: Trainer drops the columns forward does not take.
        data = raw.map(lambda ex: tokenizer(ex["sentence"], padding="max_length", max_length=BLOCK, truncation=True),
                       batched=True)  # fmt: skip
        net = transformers.AutoModelForSequenceClassification.from_pretrained(str(src / model), **overrides)
        preprocess_logits_for_metrics = None

        def compute_metrics(eval_preds: Any) -> dict[str, float]:
            logits, labels = eval_preds
            return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=max_steps,
        gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, learning_rate=2e-3,
        lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, logging_steps=1, eval_strategy="steps",
        eval_steps=3, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=report_to, bf16=bf16, use_cpu=True, seed=seed, dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    if method is not None:  # the two lines
        from replay_opt import ReplayModelWrapper, ReplayOptimizer

        net = ReplayModelWrapper(net, num_modules=modules, method=method)
        optimizer = ReplayOptimizer(optimizer, net)
    trainer = Trainer(
        model=net, args=args, train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
        data_collator=default_data_collator, compute_metrics=compute_metrics, optimizers=(optimizer, None),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    if lm:
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if save_model:
        trainer.save_model()
    history = trainer.state.log_history
    unwrapped = net.module if method is not None else net
    return {
        "losses": [h["loss"] for h in history if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in history if "grad_norm" in h],
        "learning_rates": [h["learning_rate"] for h in history if "learning_rate" in h],
        "evals": [h["eval_loss"] for h in history if "eval_loss" in h],
        "metrics": metrics,
        "label_names": trainer.label_names,
        "state": {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()},
    }
