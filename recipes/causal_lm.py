"""Train a transformers causal language model with Features Replay (or BP, DDG, DNI), offline by default.

    accelerate launch recipes/causal_lm.py                               # GPT-2-style, K=2, on Python's own sources
    accelerate launch recipes/causal_lm.py --model llama-tiny --modules 4 --method bp
    accelerate launch recipes/causal_lm.py --model gpt2 --dataset wikitext:wikitext-2-raw-v1   # with network

The model is a Hugging Face ``transformers`` model, trained the Hugging Face way -- ``out =
model(input_ids=..., labels=...)``, ``accelerator.backward(out.loss)`` -- and the two lines that make
it Features Replay are marked ``# <- replay_opt``; everything else is an ordinary Accelerate loop.
It prints the validation loss and perplexity next to the unigram baseline of the same text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipes.common import (
    add_method_arguments,
    add_run_arguments,
    begin_run,
    progress_resumed,
    start_tracking,
    summary,
)
from recipes.data import go_offline, hub_reachable
from recipes.text import STDLIB, load_text
from replay_opt import ReplayModelWrapper, ReplayOptimizer

METHODS = ("bp", "fr", "ddg", "dni", "gpipe", "1f1b")
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # short runs from scratch, as nanoGPT
CONFIGS = {  # small configurations, trained from scratch; any other --model is a hub id or a local directory
    "gpt2-tiny": ("GPT2", {"n_layer": 4, "n_embd": 128, "n_head": 4, **NO_DROPOUT}),
    "gpt2-small-8l": ("GPT2", {"n_layer": 8, "n_embd": 256, "n_head": 8, **NO_DROPOUT}),
    "llama-tiny": ("Llama", {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 352}),
}  # fmt: skip


# What the LM protocol chose (docs/benchmarks.md, "Features Replay on a language model"; bench.lm, 2000 steps, 3
# seeds, each variant at its best learning rate): per (method, K) the optimizer, the staleness remedy and the lr.
TUNED = {
    ("bp", 1): ("muon", None, 6e-3),
    ("fr", 2): ("muon", "predict", 6e-3),
    ("fr", 4): ("muon", "predict", 3e-3),
}


def tuned(method: str, modules: int) -> tuple[str, str | None, float]:
    """The protocol's (optimizer, compensation, lr) for this method and K: exact methods take BP's, the delayed ones
    FR's at K = 2, or at K = 4 for K >= 3."""
    if method in ("fr", "ddg") and modules > 1:
        return TUNED[("fr", 2 if modules == 2 else 4)]
    return TUNED[("bp", 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    method = add_method_arguments(p, METHODS)
    method.set_defaults(compensation="auto")  # (TUNED: the protocol's choice per method and K)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="gpt2-tiny", help=f"one of {sorted(CONFIGS)}, a hub id or a local directory")
    g.add_argument("--dataset", default=STDLIB, help=f"{STDLIB} (offline), a hub id[:config], or local files")
    g.add_argument("--text-column", default=None, help="the text column (default: detected)")
    g.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--val-blocks", type=int, default=256, help="validation sequences evaluated (evenly spaced)")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps (the length of the lr schedule)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs, tests)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=None, help="default: the protocol's choice for the method and K")
    g.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                   help="adamw, or muon: Muon on the hidden matrices with AdamW on the rest (default: the protocol's "
                   "choice for the method and K)")  # fmt: skip
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay to 10%%")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate (and checkpoint) every N steps")
    g.add_argument("--log-every", type=int, default=10)
    add_run_arguments(g, "outputs/causal_lm")
    args = p.parse_args(argv)
    optimizer, compensation, lr = tuned(args.method, args.modules)
    args.optimizer = args.optimizer or optimizer
    args.lr = args.lr if args.lr is not None else lr
    if args.compensation == "auto":
        args.compensation = compensation
    args.split_points = args.split_points.split(",") if args.split_points else None
    args.parser = p
    return args


def tokenizer_for(name: str) -> Any:
    """The tokenizer of a hub model or local directory; None (bytes) for the small configs."""
    if name in CONFIGS:
        return None
    import transformers

    if not Path(name).is_dir() and not hub_reachable():
        go_offline()  # the hub's cache only: fail in seconds, not after minutes of retries
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise ValueError(f"--model {name!r}: could not load its tokenizer ({reason}); use one of {sorted(CONFIGS)} "
                         "(no download), or a directory written by save_pretrained") from exc  # fmt: skip


def build(name: str, vocab_size: int, block_size: int) -> torch.nn.Module:
    """A small config trained from scratch, or a pretrained model from the hub / a local directory."""
    import transformers

    if name in CONFIGS:
        family, sizes = CONFIGS[name]
        config_class = getattr(transformers, f"{family}Config")
        positions = {"n_positions": block_size} if family == "GPT2" else {"max_position_embeddings": block_size}
        config = config_class(vocab_size=vocab_size, use_cache=False, bos_token_id=vocab_size - 1,
                              eos_token_id=vocab_size - 1, **positions, **sizes)  # fmt: skip
        model = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(config)
        model.loss_type = "ForCausalLM"  # (transformers warns when a model built from a config does not say)
        return model
    return transformers.AutoModelForCausalLM.from_pretrained(name, use_cache=False)


def make_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> Any:
    """``adamw``: AdamW (0.9, 0.95) on everything.  ``muon``: ``torch.optim.Muon`` on the 2-D hidden weights (the
    transformer blocks' matrices) and AdamW on the embeddings, norms, biases and tied head, both at ``lr`` (Muon's
    update scaled to AdamW's RMS, ``adjust_lr_fn="match_rms_adamw"``) -- the split Muon is meant for."""
    adamw = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **adamw)
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    embeddings |= {id(p) for p in head.parameters()} if head is not None else set()
    hidden, rest = [], []
    for p in model.parameters():
        (hidden if p.ndim == 2 and id(p) not in embeddings else rest).append(p)
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return [muon, torch.optim.AdamW(rest, **adamw)]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator) -> float:
    """Mean validation loss per predicted token (every rank gets the last module's numbers)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.random.fork_rng(devices=[]):
        for (ids,) in loader:
            out = model(input_ids=ids, labels=ids)
            tokens = ids[:, 1:].numel()
            sums += torch.stack([out.loss.double() * tokens, torch.tensor(float(tokens), device=sums.device)])
    model.train()
    loss, tokens = accelerator.reduce(sums, "sum").tolist()
    return loss / tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir, note, accelerator, checkpoints = begin_run(args)
    try:
        tokenizer = tokenizer_for(args.model)
        with accelerator.main_process_first():
            data = load_text(args.dataset, block_size=args.block_size, tokenizer=tokenizer,
                             text_column=args.text_column)  # fmt: skip
    except ValueError as exc:
        args.parser.error(str(exc))
    accelerator.print(data.describe())
    val_rows = torch.linspace(0, len(data.validation) - 1, min(args.val_blocks, len(data.validation))).long()
    train_loader = DataLoader(TensorDataset(data.train), batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed), drop_last=True)  # fmt: skip
    val_loader = DataLoader(TensorDataset(data.validation[val_rows]), batch_size=args.batch_size * 2)

    model = build(args.model, data.vocab_size, args.block_size)
    example = {"input_ids": data.train[:2], "labels": data.train[:2]}
    try:
        model = ReplayModelWrapper(  # <- replay_opt: line 1, split and place
            model, num_modules=args.modules if args.split_points is None else None, method=args.method,
            split_points=args.split_points, example_inputs=example, timeout=args.timeout,
            microbatches=args.microbatches,
        )  # fmt: skip
        optimizer = make_optimizer(args.optimizer, model, args.lr, args.weight_decay)  # AdamW, or [Muon, AdamW]
        optimizer = ReplayOptimizer(optimizer, model, compensation=args.compensation)  # <- replay_opt: line 2
    except ValueError as exc:
        args.parser.error(str(exc))
    replay_model = model
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    progress = progress_resumed(accelerator, args, output_dir)
    run_name = f"{args.method}-K{args.modules}-{args.model.replace('/', '-')}-s{args.seed}"
    start_tracking(accelerator, args, output_dir, note, run_name, replay_model,
                   unigram_perplexity=data.unigram_perplexity)  # fmt: skip

    stop = min(args.steps, args.max_steps or args.steps)
    history: list[dict[str, float]] = []
    loss_log: list[tuple[int, float]] = []
    bar = tqdm(total=stop, initial=progress.global_step, desc="training", mininterval=1.0,
               disable=not accelerator.is_local_main_process)  # fmt: skip
    start, tokens = time.perf_counter(), 0
    while progress.global_step < stop:
        train_loader.set_epoch(progress.epoch)
        batches = train_loader
        if progress.step_in_epoch:
            batches = accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
        for (ids,) in batches:
            out = model(input_ids=ids, labels=ids)  # the model's own loss, the Hugging Face way
            accelerator.backward(out.loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step_in_epoch += 1
            progress.global_step += 1
            tokens += ids.numel()
            bar.update()
            if progress.global_step % args.log_every == 0:
                loss = accelerator.reduce(out.loss.detach().float(), "mean").item()  # the last module's loss
                loss_log.append((progress.global_step, loss))
                bar.set_postfix(loss=f"{loss:.3f}")
                accelerator.log({"train/loss": loss, "train/lr": optimizer.param_groups[0]["lr"]},
                                step=progress.global_step)  # fmt: skip
            if progress.global_step % args.eval_every == 0 or progress.global_step == stop:
                val_loss = evaluate(model, val_loader, accelerator)
                progress.last_loss, progress.best_loss = val_loss, min(progress.best_loss, val_loss)
                elapsed = time.perf_counter() - start
                metrics = {"step": progress.global_step, "val/loss": val_loss, "val/perplexity": math.exp(val_loss),
                           "perf/tokens_per_s": tokens / elapsed}  # fmt: skip
                accelerator.log(metrics, step=progress.global_step)
                history.append(metrics)
                if accelerator.is_local_main_process:
                    bar.write(f"step {progress.global_step}/{args.steps}  validation loss {val_loss:.4f}  perplexity "
                              f"{math.exp(val_loss):.2f} (unigram {data.unigram_perplexity:.2f})  "
                              f"{tokens / elapsed:.0f} tokens/s")  # fmt: skip
                checkpoints.save(accelerator, progress.global_step)
            if progress.global_step >= stop:
                break
        else:
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    bar.close()

    results = {
        "model": args.model, "dataset": args.dataset, "method": args.method, "modules": replay_model.num_modules,
        "steps": progress.global_step, "final_val_loss": progress.last_loss,
        "final_val_perplexity": math.exp(progress.last_loss), "best_val_perplexity": math.exp(progress.best_loss),
        "unigram_perplexity": data.unigram_perplexity, "history": history, "train_loss_log": loss_log,
    }  # fmt: skip
    accelerator.log({"final/val_perplexity": results["final_val_perplexity"]})
    accelerator.print(
        "\n| Model | Data | Method | K | Validation perplexity | Unigram baseline |\n|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.dataset} | {args.method.upper()} | {replay_model.num_modules} | "
        f"{results['final_val_perplexity']:.2f} | {data.unigram_perplexity:.2f} |"
    )
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        plot(results, output_dir / "results.png")
    accelerator.end_training()
    headline = (f"validation perplexity {results['final_val_perplexity']:.2f} after {progress.global_step} steps "
                f"(unigram baseline {data.unigram_perplexity:.2f})")  # fmt: skip
    accelerator.print(summary(headline, output_dir, checkpoints, args.report_to, note, bool(progress.global_step)))
    return results


def plot(results: dict[str, Any] | list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation perplexity against the step (one line per run), with the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results if isinstance(results, list) else [results]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        label = f"{r['method'].upper()} K={r['modules']} {r['model']}"
        if r["train_loss_log"]:
            ax_loss.plot(*zip(*r["train_loss_log"]), label=label, lw=1)
        ax_ppl.plot([h["step"] for h in r["history"]], [h["val/perplexity"] for h in r["history"]], marker="o",
                    label=label)  # fmt: skip
    ax_ppl.axhline(runs[0]["unigram_perplexity"], color="gray", ls="--", label="unigram baseline")
    ax_loss.set(xlabel="step", ylabel="training loss (nats / token)", title="train/loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
