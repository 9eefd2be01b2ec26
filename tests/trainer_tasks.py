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
    specials = ["[UNK]", "[PAD]", "[EOS]"]
    tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=160, special_tokens=specials))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                           eos_token="[EOS]")  # fmt: skip
    tokenizer.save_pretrained(str(out / "tokenizer"))
    vocab = len(tokenizer)
    torch.manual_seed(0)
    gpt2 = tf.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0
    )  # tied embeddings; use_cache=True
    llama = tf.LlamaConfig(
        num_hidden_layers=2,
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
    bert = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=vocab, num_labels=3, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    configs = {
        "gpt2": (tf.GPT2LMHeadModel, gpt2),
        "llama": (tf.LlamaForCausalLM, llama),
        "bert": (tf.BertForSequenceClassification, bert),
    }
    for name, (model_class, config) in configs.items():
        model_class(config).save_pretrained(str(out / name))


def load(root: str, model: str, dropout: bool = True) -> tuple[Any, Any, Any]:
    """(datasets, model, tokenizer) as the scripts load them: ``run_clm*.py`` for the causal LMs (text files,
    tokenized, grouped into blocks), ``run_classification.py`` / ``run_glue_no_trainer.py`` for BERT (csv)."""
    import datasets
    import transformers
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bar()
    src = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
    overrides = {} if dropout else (
        {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model == "gpt2"
        else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if model == "bert" else {}
    )  # fmt: skip
    if model != "bert":
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
    else:
        raw = datasets.load_dataset("csv", data_files={s: str(src / f"{s}.csv") for s in ("train", "validation")})
        # The "sentence" column stays: Trainer drops the columns forward does not take.
        data = raw.map(lambda ex: tokenizer(ex["sentence"], padding="max_length", max_length=BLOCK, truncation=True),
                       batched=True)  # fmt: skip
        net = transformers.AutoModelForSequenceClassification.from_pretrained(str(src / model), **overrides)
    return data, net, tokenizer


def fresh_accelerate() -> None:
    """Accelerate's state as in a fresh process (an earlier run in this process, mixed precision and all, set its
    own; the process group, if any, stays)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def two_lines(net: Any, optimizer: Any, method: str | None, modules: int) -> tuple[Any, Any]:
    """The two lines (nothing, for the unmodified script)."""
    if method is None:
        return net, optimizer
    from replay_opt import ReplayModelWrapper, ReplayOptimizer

    net = ReplayModelWrapper(net, num_modules=modules, method=method)
    return net, None if optimizer is None else ReplayOptimizer(optimizer, net)


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
    """``run_clm.py`` / ``run_classification.py`` (Trainer); returns what it logged, its metrics and the trained
    weights (on every rank)."""
    import transformers
    from transformers import Trainer, TrainingArguments, default_data_collator

    fresh_accelerate()
    transformers.set_seed(seed)
    data, net, tokenizer = load(root, model, dropout)
    lm = model != "bert"

    def preprocess_logits_for_metrics(logits: Any, labels: Any) -> Any:
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(eval_preds: Any) -> dict[str, float]:
        preds, labels = eval_preds
        if lm:
            labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
        return {"accuracy": float((preds == labels).mean())}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=max_steps,
        gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, learning_rate=2e-3,
        lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, logging_steps=1, eval_strategy="steps",
        eval_steps=3, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=report_to, bf16=bf16, use_cpu=True, seed=seed, dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    net, optimizer = two_lines(net, torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01), method, modules)
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


def train_no_trainer(
    root: str,
    out: str,
    *,
    model: str = "gpt2",
    method: str | None = None,
    modules: int = 2,
    max_steps: int = 6,
    accumulation: int = 2,
    checkpoint_steps: int | None = None,
    resume: str | None = None,
    dropout: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """``run_clm_no_trainer.py`` / ``run_glue_no_trainer.py``: the Accelerate loop, its checkpoints
    (``save_state`` / ``load_state`` + ``skip_first_batches``) and its ``save_pretrained``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_scheduler

    fresh_accelerate()
    # A seedable sampler, so that a resumed run sees the batches the uninterrupted one saw (Accelerate's way).
    loaders = DataLoaderConfiguration(use_seedable_sampler=True)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True, dataloader_config=loaders)
    set_seed(seed)
    data, net, _ = load(root, model, dropout)
    lm = model != "bert"
    if not lm:
        data = data.remove_columns(["sentence"]).rename_column("label", "labels")
    train_loader = DataLoader(data["train"], shuffle=True, collate_fn=default_data_collator, batch_size=4)
    eval_loader = DataLoader(data["validation"], collate_fn=default_data_collator, batch_size=4)
    no_decay = ["bias", "LayerNorm.weight", "layer_norm.weight"]
    groups = [
        {"params": [p for n, p in net.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in net.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    net, optimizer = two_lines(net, optimizer, method, modules)  # before the script reads num_processes
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2 * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)  # fmt: skip
    net, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        net, optimizer, train_loader, eval_loader, scheduler
    )
    completed, start, losses = 0, 0, []
    if resume is not None:
        accelerator.load_state(resume)
        completed = int(Path(resume).name.removeprefix("step_"))
        start = completed * accumulation
    epochs = math.ceil(max_steps * accumulation / len(train_loader))
    for epoch in range(epochs):
        net.train()
        skip = start - epoch * len(train_loader)
        loader = accelerator.skip_first_batches(train_loader, skip) if 0 < skip < len(train_loader) else train_loader
        if skip >= len(train_loader):
            continue
        for batch in loader:
            with accelerator.accumulate(net):
                loss = net(**batch).loss
                losses.append(loss.item())
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed += 1
                if checkpoint_steps and completed % checkpoint_steps == 0:
                    accelerator.save_state(str(Path(out) / f"step_{completed}"))
            if completed >= max_steps:
                break
        if completed >= max_steps:
            break
    net.eval()
    eval_losses, correct = [], []
    for batch in eval_loader:
        with torch.no_grad():
            outputs = net(**batch)
        eval_losses.append(accelerator.gather_for_metrics(outputs.loss.repeat(4)))
        if not lm:
            predictions, references = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
            correct.append(predictions == references)
    eval_loss = torch.cat(eval_losses).mean().item()
    metrics = {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss)} if lm else {
        "eval_loss": eval_loss, "accuracy": torch.cat(correct).float().mean().item()}  # fmt: skip
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(net)
    unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    return {
        "losses": losses,
        "metrics": metrics,
        "state": {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()},
    }


def generate_in_a_pipeline(root: str) -> str:
    """``generate`` on a wrapper running one process per module: the error it raises (on every rank)."""
    from transformers import AutoModelForCausalLM

    fresh_accelerate()
    net, _ = two_lines(AutoModelForCausalLM.from_pretrained(str(Path(root) / "gpt2")), None, "fr", 2)
    try:
        net.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)
    except RuntimeError as exc:
        return str(exc)
    return "no error"
