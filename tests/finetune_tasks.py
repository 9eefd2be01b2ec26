"""Fine-tuning the Hugging Face way -- PEFT's LoRA and TRL's ``SFTTrainer`` -- plain or with the two lines.

The files are ``trainer_tasks.prepare``'s: a tiny Llama written by ``save_pretrained`` (``use_cache=True``), a
tokenizer trained with ``tokenizers``, text files read with ``load_dataset``.  Each task runs the script a user
writes -- ``get_peft_model(model, LoraConfig(...))``, ``Trainer`` / ``SFTTrainer`` / an Accelerate loop --
with ``method=None`` unmodified, otherwise with the two lines added and nothing else changed.  Each returns
what it logged and the trained weights, on every rank (in this process or on a ``tests/cluster.py`` cluster).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import trainer_tasks

# Dropout on the adapters' inputs: one process per module must draw one process's masks.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def quiet() -> None:
    import datasets

    for name in ("transformers", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bar()


def base(root: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(Path(root) / "llama"))


def lora(root: str, net: Any = None) -> Any:
    """The LoRA model of ``get_peft_model`` (its adapters drawn from seed 0, as the scripts seed before)."""
    import peft

    net = base(root) if net is None else net
    torch.manual_seed(0)
    return peft.get_peft_model(net, peft.LoraConfig(**LORA))


def text(root: str) -> Any:
    import datasets

    files = {s: str(Path(root) / f"{s}.txt") for s in ("train", "validation")}
    raw = datasets.load_dataset("text", data_files=files)
    return raw.filter(lambda row: len(row["text"].split()) >= 4)


def two_lines(net: Any, optimizer: Any, method: str | None, modules: int) -> tuple[Any, Any]:
    return trainer_tasks.two_lines(net, optimizer, method, modules)


def after_first_step(net: Any, method: str | None) -> Any:
    """A Trainer callback keeping every weight after the first optimizer step (``first``)."""
    from transformers import TrainerCallback

    class First(TrainerCallback):
        def __init__(self) -> None:
            self.first: dict[str, torch.Tensor] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                self.first = weights(net, method)

    return First()


def weights(net: Any, method: str | None) -> dict[str, torch.Tensor]:
    """Every weight of the model (the PEFT model's keys), on every rank."""
    model = net.module if method is not None else net
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def lora_trainer(
    root: str,
    out: str,
    *,
    method: str | None = None,
    modules: int = 2,
    max_steps: int = 3,
    save_steps: int | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """``Trainer`` on a LoRA model (``run_clm.py`` with PEFT): grouped text blocks, AdamW on the adapter."""
    import transformers
    from transformers import Trainer, TrainingArguments, default_data_collator

    trainer_tasks.fresh_accelerate()
    quiet()
    transformers.set_seed(0)
    data, net, tokenizer = trainer_tasks.load(root, "llama")
    net = lora(root, net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net, optimizer = two_lines(net, optimizer, method, modules)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=max_steps, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, seed=0,
    )  # fmt: skip
    first = after_first_step(net, method)
    trainer = Trainer(model=net, args=args, train_dataset=data["train"], processing_class=tokenizer,
                      data_collator=default_data_collator, optimizers=(optimizer, None), callbacks=[first])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    history = trainer.state.log_history
    return {"losses": [h["loss"] for h in history if "loss" in h], "weights": weights(net, method),
            "first": first.first}  # fmt: skip


def sft(
    root: str,
    out: str,
    *,
    method: str | None = None,
    modules: int = 2,
    peft: bool = False,
    max_steps: int = 3,
    bf16: bool = False,
) -> dict[str, Any]:
    """``SFTTrainer`` with ``SFTConfig``'s defaults -- gradient checkpointing on, the fused LM head, its
    ``entropy`` / ``mean_token_accuracy`` metrics, padding and truncation -- except the run's length, the CPU, and
    bf16 (``bf16=False`` compares to the bit; SFTConfig's default bf16 computes TRL's head and the model's in
    bfloat16, each rounding its own way)."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    trainer_tasks.fresh_accelerate()
    quiet()
    transformers.set_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(root) / "tokenizer"))
    net = lora(root) if peft else base(root)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net, optimizer = two_lines(net, optimizer, method, modules)
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=max_steps, max_length=24,
                     logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                     bf16=bf16)  # fmt: skip
    first = after_first_step(net, method)
    trainer = SFTTrainer(model=net, args=args, train_dataset=text(root)["train"], processing_class=tokenizer,
                         optimizers=(optimizer, None), callbacks=[first])  # fmt: skip
    trainer.train()
    trainer.save_model()
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h]
    return {
        "losses": [h["loss"] for h in logged],
        "accuracy": [h["mean_token_accuracy"] for h in logged],
        "entropy": [h["entropy"] for h in logged],
        "checkpointing": args.gradient_checkpointing and (method is None or net.is_gradient_checkpointing),
        "weights": weights(net, method),
        "first": first.first,
    }


def lora_loop(root: str, out: str, *, method: str | None = None, modules: int = 2, steps: int = 3) -> dict[str, Any]:
    """A LoRA model in an Accelerate loop (``out = model(input_ids=..., labels=...)``), saved with
    ``unwrap_model(model).save_pretrained``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    trainer_tasks.fresh_accelerate()
    quiet()
    # (mixed_precision named: a bf16 TrainingArguments earlier in the process leaves ACCELERATE_MIXED_PRECISION set)
    accelerator = Accelerator(cpu=True, mixed_precision="no",
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))  # fmt: skip
    set_seed(0)
    data, net, _ = trainer_tasks.load(root, "llama")
    net = lora(root, net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net, optimizer = two_lines(net, optimizer, method, modules)
    loader = DataLoader(data["train"].with_format("torch"), batch_size=4, shuffle=True,
                        collate_fn=default_data_collator)  # fmt: skip
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    net.train()
    losses = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        output = net(input_ids=batch["input_ids"], labels=batch["labels"])
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(output.loss.detach()).mean().item())
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(net).save_pretrained(out, is_main_process=accelerator.is_main_process,
                                                  save_function=accelerator.save)  # fmt: skip
    return {"losses": losses, "weights": weights(net, method)}


def reload_adapter(root: str, directory: str) -> dict[str, torch.Tensor]:
    """``PeftModel.from_pretrained(base, dir)``: the saved adapter, on a fresh base model."""
    from peft import PeftModel

    return {k: v.clone() for k, v in PeftModel.from_pretrained(base(root), directory).state_dict().items()}


def dpo(root: str, out: str, *, method: str | None = None, modules: int = 2, max_steps: int = 2) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` on a LoRA model (the reference is the model with its adapters off): prompts, chosen
    and rejected continuations cut from the text file."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    trainer_tasks.fresh_accelerate()
    quiet()
    transformers.set_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(root) / "tokenizer"))
    rows = [r["text"] for r in text(root)["train"] if len(r["text"]) >= 60][:16]
    pairs = {"prompt": [r[:20] for r in rows], "chosen": [r[20:40] for r in rows], "rejected": [r[40:60] for r in rows]}
    net = lora(root)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net, optimizer = two_lines(net, optimizer, method, modules)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=max_steps, logging_steps=1,
                     report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", bf16=False)  # fmt: skip
    trainer = DPOTrainer(model=net, args=args, train_dataset=datasets.Dataset.from_dict(pairs),
                         processing_class=tokenizer, optimizers=(optimizer, None))  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    return {"losses": [h["loss"] for h in history if "loss" in h], "weights": weights(net, method)}
