"""Where FR's gradient on a transformer LM goes wrong: per module and per part of the model, the cosine of the
gradient each method applies to the true backprop gradient at the same weights, over the first steps.

    python -m bench.lm_diagnosis --modules 2 4 --runs fr:none fr:predict ddg:none --steps 300 --every 5 \\
        --out bench/results/lm_diagnosis

The LM recipe's model, data and AdamW (gpt2-tiny, batch 16 x 128 byte tokens of Python's own sources, AdamW (0.9,
0.95), weight decay 0.1, lr 1e-3, 40 warm-up steps of the 400-step schedule), trained by ``ReplayModelWrapper``
with the method and compensation named.  Every ``--every`` steps, after ``backward()`` and before the step, module
i's gradient g (D = K-1-i steps stale: it belongs to the batch of step t-D) is compared with, computed by plain
autograd on an untied copy of the model (so the tied embedding's two uses separate: the head's part is always
this step's batch):

* ``true``  -- the gradient of that same batch's loss at this step's weights w^t: what BP would apply for it;
* ``stash`` -- the gradient of that batch's loss at the weights of D steps earlier, w^{t-D}: a replay with stashed
  weights (PipeDream) gives this; at K=2 it is DDG's gradient exactly.

Reported per module and per part (embeddings, attention and MLP matrices, LayerNorm gains and biases): cos(g,
true), cos(stash, true) -- the cost of the delay alone --, cos(g, stash) -- the replay's own mismatch -- and
|g| / |true|, as a table of means over step ranges (markdown), every measurement (JSON) and curves (PNG).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

PARTS = ("embeddings", "attention", "mlp", "layernorm", "head")


def part_of(name: str) -> str:
    """The part of GPT-2 a parameter belongs to (the tied embedding counts as embeddings)."""
    if ".ln_" in name or name.startswith(("transformer.ln_f", "ln_f")):
        return "layernorm"
    if "wte" in name or "wpe" in name:
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "head"


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]).double(), torch.cat([t.flatten() for t in b]).double()
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))


def norm_ratio(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(x.norm() / y.norm().clamp_min(1e-30))


class Reference:
    """Plain autograd on an untied copy: per parameter name of the tied model, the gradient of one batch's loss at
    given weights -- the tied embedding's head part taken from ``head_batch``."""

    def __init__(self, model: torch.nn.Module) -> None:
        import copy

        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = False
        self.model = type(model)(config)
        self.model.loss_type = "ForCausalLM"
        self.tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        self.head = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            own = dict(self.model.named_parameters())
            for name, value in weights.items():
                own[name].copy_(value)
            if self.tied:
                self.model.get_output_embeddings().weight.copy_(weights[self.head])

    def gradients(self, weights: dict[str, torch.Tensor], batch: torch.Tensor, head_weights: dict[str, torch.Tensor],
                  head_batch: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        self.load(weights)
        self.model.zero_grad(set_to_none=True)
        self.model(input_ids=batch, labels=batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if n in weights}
        if self.tied:  # the head's use of the tied weight: this step's batch at this step's weights, as every method
            if batch is not head_batch or weights is not head_weights:  # (else the pass above computed it)
                self.load(head_weights)
                self.model.zero_grad(set_to_none=True)
                self.model(input_ids=head_batch, labels=head_batch).loss.backward()
            grads[self.head] = grads[self.head] + self.model.get_output_embeddings().weight.grad
        return grads


def diagnose(method: str, compensation: str, k: int, args: argparse.Namespace) -> list[dict]:
    """Train with ``method`` at K=k; every ``args.every`` steps, one record per (module, part)."""
    from torch.utils.data import DataLoader, TensorDataset

    from recipes.causal_lm import build, lr_lambda
    from recipes.text import STDLIB, load_text
    from replay_opt import ReplayModelWrapper, ReplayOptimizer

    torch.manual_seed(args.seed)
    data = load_text(STDLIB, block_size=args.block_size)
    loader = DataLoader(TensorDataset(data.train), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    model = build("gpt2-tiny", data.vocab_size, args.block_size)
    reference = Reference(model)
    names = {id(p): n for n, p in model.named_parameters()}
    example = {"input_ids": data.train[:2], "labels": data.train[:2]}
    wrapper = ReplayModelWrapper(model, num_modules=k, method=method, example_inputs=example)
    inner = torch.optim.AdamW(wrapper.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer = ReplayOptimizer(inner, wrapper, compensation=None if compensation == "none" else compensation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.schedule))
    stage_of: dict[str, int] = {}  # (the tied embedding: module 1's, where its delayed use is)
    for s, stage in enumerate(wrapper.partition.stages):
        for p in stage.parameters():
            stage_of.setdefault(names[id(p)], s)
    batches: collections.deque = collections.deque(maxlen=k)
    weights: collections.deque = collections.deque(maxlen=k)  # w^t, w^{t-1}, ... (newest last)
    records: list[dict] = []
    step = 0
    while step < args.steps:
        for (ids,) in loader:
            batches.append(ids)
            optimizer.compensation.restore()  # (w^t itself, not a prediction: the snapshot and the reference)
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            out = wrapper(input_ids=ids, labels=ids)
            out.loss.backward()
            if step % args.every == 0 and step >= k:
                records += measure(wrapper, names, stage_of, reference, batches, weights, k, step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.steps:
                break
    for r in records:
        r.update(method=method, compensation=compensation, K=k)
    return records


def measure(wrapper, names, stage_of, reference, batches, weights, k, step) -> list[dict]:
    applied = {names[id(p)]: p.grad.detach().clone() for p in wrapper.parameters() if p.grad is not None}
    records = []
    for i in range(k):
        delay = k - 1 - i
        batch = batches[-1 - delay]
        true = reference.gradients(weights[-1], batch, weights[-1], batches[-1])
        stash = reference.gradients(weights[-1 - delay], batch, weights[-1], batches[-1]) if delay else true
        own = [n for n, s in stage_of.items() if s == i and n in applied]
        for part in ("all", *PARTS):
            chosen = [n for n in own if part == "all" or part_of(n) == part]
            if not chosen:
                continue
            g, t, s = ([d[n] for n in chosen] for d in (applied, true, stash))
            records.append({"step": step, "module": i + 1, "delay": delay, "part": part,
                            "cos_true": cosine(g, t), "cos_stash_true": cosine(s, t), "cos_stash": cosine(g, s),
                            "norm_ratio": norm_ratio(g, t)})  # fmt: skip
    return records


def tabulate(records: list[dict], ranges: Sequence[tuple[int, int]]) -> str:
    lines = ["| run | K | module (delay) | part | steps | cos(g, true) | cos(stash, true) | cos(g, stash) "
             "| \\|g\\|/\\|true\\| |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups = sorted({(r["method"], r["compensation"], r["K"], r["module"], r["delay"], r["part"]) for r in records},
                    key=lambda g: (g[2], g[0], g[1], g[3], PARTS.index(g[5]) + 1 if g[5] != "all" else 0))  # fmt: skip
    for method, comp, k, module, delay, part in groups:
        for lo, hi in ranges:
            rs = [r for r in records if (r["method"], r["compensation"], r["K"], r["module"], r["part"]) ==
                  (method, comp, k, module, part) and lo <= r["step"] < hi]  # fmt: skip
            if not rs:
                continue
            keys = ("cos_true", "cos_stash_true", "cos_stash", "norm_ratio")
            mean = {key: statistics.mean(r[key] for r in rs) for key in keys}
            run = method + ("" if comp == "none" else f" +{comp}")
            cells = [f"{mean[key]:.3f}" for key in keys[:3]] + [f"{mean['norm_ratio']:.2f}"]
            lines.append(f"| {run} | {k} | {module} ({delay}) | {part} | {lo}-{hi} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """cos(g, true) of module 1 (the most delayed) against step, per run, whole module and per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({(r["K"], r["method"], r["compensation"]) for r in records})
    fig, axes = plt.subplots(1, 1 + len(PARTS) - 1, figsize=(16, 3.6), sharey=True)
    for ax, part in zip(axes, ("all", "embeddings", "attention", "mlp", "layernorm")):
        for k, method, comp in runs:
            rs = [r for r in records if (r["K"], r["method"], r["compensation"], r["module"], r["part"]) ==
                  (k, method, comp, 1, part)]  # fmt: skip
            if rs:
                label = f"{method.upper()} K={k}" + ("" if comp == "none" else f" +{comp}")
                ax.plot([r["step"] for r in rs], [r["cos_true"] for r in rs], label=label, lw=1)
        ax.set(title=f"module 1: {part}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(applied gradient, true gradient)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", type=int, nargs="+", default=[2, 4])
    p.add_argument("--runs", nargs="+", default=["fr:none", "fr:predict", "ddg:none"], help="method:compensation")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=5, help="measure every N steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--schedule", type=int, default=400, help="the length of the lr schedule (the recipe's --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/lm_diagnosis"))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for k in args.modules:
        for run in args.runs:
            method, _, comp = run.partition(":")
            records += diagnose(method, comp or "none", k, args)
            print(f"{method} {comp} K={k}: done", flush=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "records": records}))  # fmt: skip
    table = tabulate(records, [(0, 100), (100, args.steps)])
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    plot(records, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
