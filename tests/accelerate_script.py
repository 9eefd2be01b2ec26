"""A standard Accelerate training script changed by the two lines, as users write one.

Adapted from Accelerate's ``examples/cv_example.py`` and ``examples/by_feature/`` (checkpointing,
gradient_accumulation, tracking), with a small local classification task in place of the data
and model.  Every feature is a switch, so the tests run the same script in one process and in
one process per module and compare what it logged and saved.  ``run(**options)`` returns, on
every rank, what the main process would report.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from replay_opt import ReplayModelWrapper, ReplayOptimizer


class OwnLoss(nn.Module):
    """A model that computes its own loss when given labels, as transformers models do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))  # fmt: skip


def run(
    *,
    modules: int = 2,
    method: str = "fr",
    epochs: int = 2,
    batch_size: int = 8,
    mixed_precision: str = "no",
    accumulation: int = 1,
    clip: float | None = None,
    scheduler: bool = True,
    own_loss: bool = False,
    second_backward_after: float | None = None,
    eval_on_main_only: bool = False,
    skip_step_on_rank: int | None = None,
    extra_batches_on_rank: int | None = None,
    nan_at: int | None = None,
    nan_fix: bool = False,
    hang_rank: int | None = None,
    save_dir: str | None = None,
    resume_dir: str | None = None,
    split_points: list[str] | None = None,
    timeout: float = 60.0,
    train_size: int = 100,
    shuffle: bool = True,
    ending: str = "end_training",
    pid_dir: str | None = None,
) -> dict[str, Any]:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation)
    set_seed(0)
    model: nn.Module = net()
    if own_loss:
        model = OwnLoss(model)
    points = split_points or (["net.4"] if own_loss else ["4"])
    model = ReplayModelWrapper(model, split_points=points if modules > 1 else None, num_modules=modules,
                               method=method, timeout=timeout)  # line 1  # fmt: skip
    optimizer = ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)  # line 2
    rank = accelerator.process_index
    if pid_dir:  # (a test kills the launcher once every rank is training)
        Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    train_set = data(train_size + (8 if extra_batches_on_rank == rank else 0), 0)
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
    )
    eval_loader = DataLoader(data(60, 1), batch_size=16)  # 60 rows: a last batch of 12
    lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.1, total_steps=epochs * math.ceil(len(train_set) / batch_size) // accumulation + 1
    )
    objects = [model, optimizer, train_loader, eval_loader] + ([lr_scheduler] if scheduler else [])
    model, optimizer, train_loader, eval_loader, *rest = accelerator.prepare(*objects)
    if resume_dir:
        accelerator.load_state(resume_dir)
    logged: list[float] = []
    lrs: list[float] = []
    dtypes: set[str] = set()
    step = 0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            with accelerator.accumulate(model):
                if own_loss:
                    out = model(x, labels=y)
                    loss, logits = out["loss"], out["logits"]
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                dtypes.add(str(logits.dtype))
                if nan_at == step:
                    loss = loss * float("nan")
                bad = accelerator.gather(loss.detach()).isnan().any() if nan_fix else loss.isnan()
                if bad:
                    step += 1
                    if nan_fix:
                        optimizer.zero_grad()
                    continue  # skip the step
                if second_backward_after is not None:
                    accelerator.backward(loss * 0.5, retain_graph=True)
                    if step < 3:
                        time.sleep(second_backward_after)  # user code between the two backward passes
                    accelerator.backward(loss * 0.5)
                else:
                    accelerator.backward(loss)
                if clip is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                if skip_step_on_rank != rank:
                    optimizer.step()
                if scheduler:
                    rest[0].step()
                optimizer.zero_grad()
            logged.append(loss.item())  # what the main process logs
            lrs.append(optimizer.param_groups[0]["lr"])
            step += 1
        if hang_rank == rank:
            time.sleep(2 * timeout)  # (past the others' timeout: they report it)
        accelerator.wait_for_everyone()
    correct = total = 0
    model.eval()
    if not eval_on_main_only or accelerator.is_main_process:
        for x, y in eval_loader:
            with torch.no_grad():
                out = model(x)
            logits = out["logits"] if own_loss else out
            predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), y))
            correct += (predictions == references).sum().item()
            total += len(references)
    accelerator.wait_for_everyone()
    if save_dir:
        accelerator.save_state(os.path.join(save_dir, "state"))
        accelerator.save_model(model, os.path.join(save_dir, "model"))
    unwrapped = accelerator.unwrap_model(model)
    weights = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    if ending == "end_training":
        accelerator.end_training()
    elif ending == "destroy":
        torch.distributed.destroy_process_group()
    return {
        "logged": logged,
        "lrs": lrs,
        "accuracy": correct / max(total, 1),
        "evaluated": total,
        "weights": weights,
        "unwrapped": type(unwrapped).__name__,
        "dtypes": sorted(dtypes),
        "main": accelerator.is_main_process,
    }


if __name__ == "__main__":  # `accelerate launch tests/accelerate_script.py`: the script as users run it
    import sys

    args = dict(arg.removeprefix("--").split("=", 1) for arg in sys.argv[1:])  # --ending=return --method=bp ...
    result = run(
        ending=args.get("ending", "end_training"), method=args.get("method", "fr"),
        epochs=int(args.get("epochs", 2)), pid_dir=args.get("pid-dir"),
    )  # fmt: skip
    print(f"logged {len(result['logged'])} losses, accuracy {result['accuracy']:.3f}")
