"""Train a ResNet on CIFAR (or any image-classification data) with Features Replay, DDG, DNI or plain BP.

Reproduces the experiments of Huo, Gu & Huang, "Training Neural Networks Using
Features Replay" (NeurIPS 2018), Section 5, with the paper's schedule as defaults:

    accelerate launch recipes/resnet_cifar.py --model resnet110 --method fr --modules 2
    accelerate launch recipes/resnet_cifar.py --dataset digits --model resnet20 --epochs 3   # offline

The lines that make this a Features Replay script are marked ``# <- replay_opt``;
everything else is an ordinary Accelerate training loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipes.common import (
    add_method_arguments,
    add_run_arguments,
    begin_run,
    peak_memory_mb,
    progress_resumed,
    start_tracking,
    summary,
)
from recipes.data import Augment, load_image_data
from recipes.models import CIFAR_MODELS, build_model
from replay_opt import ReplayModelWrapper, ReplayOptimizer, SigmaProbe

METHODS = ("bp", "fr", "ddg", "dni", "dgl", "gpipe", "1f1b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = add_method_arguments(p, METHODS)
    g.add_argument("--balance", default="params", help='"params", "time", or comma-separated unit counts')
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet110", help=f"one of: {CIFAR_MODELS}")
    g.add_argument(
        "--dataset",
        default="cifar10",
        help="cifar10, cifar100, a hub id, a save_to_disk directory, parquet files, or 'digits' (offline)",
    )
    g.add_argument("--image-column", default=None, help="image column (default: detected)")
    g.add_argument("--label-column", default=None, help="label column (default: detected)")
    g = p.add_argument_group("schedule (the paper's defaults)")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--milestones", default="150,225", help="epochs at which the learning rate is divided")
    g.add_argument("--gamma", type=float, default=0.1, help="learning-rate factor at each milestone")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--log-every", type=int, default=20, help="log the training loss every N steps")
    g.add_argument(
        "--diagnostics-every",
        type=int,
        default=None,
        help="every N steps, log each module's sigma against the true gradient of the same samples (staleness) "
        "and of a 512-sample reference batch (the paper's sigma, Fig. 3); one process",
    )
    add_run_arguments(g, "outputs/resnet_cifar")
    args = p.parse_args(argv)
    args.milestones = [int(m) for m in args.milestones.split(",") if m]
    args.split_points = args.split_points.split(",") if args.split_points else None
    if args.balance not in ("params", "time"):
        try:
            args.balance = [int(c) for c in args.balance.split(",")]
        except ValueError:
            p.error(f'--balance takes "params", "time" or comma-separated integers, got {args.balance!r}')
    args.parser = p
    return args


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, augment: Augment, accelerator: Accelerator) -> tuple[float, float]:
    # Evaluation must not move the training RNG (a data loader draws a seed when it starts):
    # otherwise evaluating, or stopping to checkpoint, would change the run.
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        return _evaluate(model, loader, augment, accelerator)


def _evaluate(model, loader, augment: Augment, accelerator: Accelerator) -> tuple[float, float]:
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, count
    for x, y in loader:
        out = model(augment.normalize(x))  # one process per module: a forward-only pass through the ranks
        out, y = accelerator.gather_for_metrics((out, y))  # every rank gets the last modules' outputs
        sums += torch.stack(
            [F.cross_entropy(out.float(), y, reduction="sum"), (out.argmax(1) == y).sum(), y.new_tensor(len(y))]
        ).double()
    model.train()
    return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir, note, accelerator, checkpoints = begin_run(args)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        with accelerator.main_process_first():
            data = load_image_data(args.dataset, image_column=args.image_column, label_column=args.label_column)
    except ValueError as exc:
        args.parser.error(str(exc))
    augment = Augment(data.mean, data.std)
    # A generator of its own: starting an epoch must not draw from the global RNG, or a resume
    # in mid-epoch (which starts the epoch's iterator again) would shift every later random draw.
    train_loader = DataLoader(
        TensorDataset(data.train_x, data.train_y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=512)

    try:
        model = build_model(args.model, data.num_classes).to(accelerator.device)
        example = (augment.normalize(data.train_x[: args.batch_size].to(accelerator.device)),)
        model = ReplayModelWrapper(  # <- replay_opt: line 1, split and place
            model,
            num_modules=args.modules if args.split_points is None else None,
            method=args.method,
            split_points=args.split_points,
            balance=args.balance,
            example_inputs=example if args.balance == "time" else None,
            timeout=args.timeout,
            microbatches=args.microbatches,
        )
    except ValueError as exc:
        args.parser.error(str(exc))
    replay_model = model  # the wrapper (accelerator.unwrap_model gives the ResNet it wraps)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    try:
        optimizer = ReplayOptimizer(  # <- replay_opt: line 2
            optimizer, model, grad_scaler=accelerator.scaler, compensation=args.compensation
        )
    except ValueError as exc:
        args.parser.error(str(exc))
    # Milestones count single-process steps: a prepared scheduler steps once per data-parallel process.
    steps_per_epoch_alone = len(train_loader)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[m * steps_per_epoch_alone for m in args.milestones], gamma=args.gamma
    )
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    steps_per_epoch = len(train_loader)
    probe = None
    if args.diagnostics_every:
        reference_rows = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))[:512]

        def reference() -> tuple[tuple[torch.Tensor], torch.Tensor]:  # the expected gradient's stand-in
            x = data.train_x[reference_rows].to(accelerator.device)
            return (augment(x),), data.train_y[reference_rows].to(accelerator.device)

        probe = SigmaProbe(replay_model, loss_fn=F.cross_entropy, every=args.diagnostics_every, reference=reference)
    progress = progress_resumed(accelerator, args, output_dir)

    run_name = f"{args.method}-K{args.modules}-{args.model.replace(':', '-')}-{Path(args.dataset).name}-s{args.seed}"
    start_tracking(accelerator, args, output_dir, note, run_name, replay_model,
                   num_modules=replay_model.num_modules, steps_per_epoch=steps_per_epoch)  # fmt: skip

    max_steps = args.max_steps or args.epochs * steps_per_epoch
    history: list[dict[str, float]] = []  # per-epoch metrics of this run
    loss_log: list[tuple[int, float]] = []  # (step, loss) every --log-every steps
    done = progress.global_step >= max_steps
    bn_note_shown = False
    while progress.epoch < args.epochs and not done:
        epoch = progress.epoch
        train_loader.set_epoch(epoch)
        batches = train_loader
        if progress.step_in_epoch:
            batches = accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, seen
        start, held = time.perf_counter(), None
        bar = tqdm(
            total=steps_per_epoch,
            initial=progress.step_in_epoch,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not accelerator.is_local_main_process,
            mininterval=1.0,
        )
        for x, y in batches:
            # Count the bytes held for backward on the epoch's last step; accounting starts K steps
            # earlier so that graphs kept across steps (DDG) are counted too.
            steps_left = min(steps_per_epoch - progress.step_in_epoch, max_steps - progress.global_step)
            replay_model.track_memory = steps_left <= replay_model.num_modules
            last_step = steps_left == 1
            inputs = augment(x)
            out = model(inputs)
            loss = F.cross_entropy(out, y)
            accelerator.backward(loss)
            record = probe.measure((inputs,), y) if probe is not None else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if record is not None:
                logged = {f"diagnostics/{name}_module{k}": v for name in ("sigma_staleness", "sigma_expected",
                          "cosine_staleness", "cosine_expected") for k, v in enumerate(record[name], 1)}  # fmt: skip
                accelerator.log(logged, step=progress.global_step)
            if last_step:
                held = replay_model.memory_report()
                replay_model.track_memory = False
            sums += torch.stack(
                [loss.detach() * len(y), (out.detach().argmax(1) == y).sum(), y.new_tensor(len(y))]
            ).double()
            progress.step_in_epoch += 1
            progress.global_step += 1
            bar.update()
            if progress.global_step % args.log_every == 0:
                step_loss = accelerator.reduce(loss.detach().float(), "mean").item()  # the last module's loss
                loss_log.append((progress.global_step, step_loss))
                bar.set_postfix(loss=f"{step_loss:.3f}")
                lr = optimizer.param_groups[0]["lr"]
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=progress.global_step)
            if progress.global_step >= max_steps:
                done = True
                break
        bar.close()
        elapsed = time.perf_counter() - start
        epoch_finished = progress.step_in_epoch >= steps_per_epoch
        if epoch_finished:
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
        loss_sum, correct, seen = accelerator.reduce(sums, "sum").tolist()  # one collective
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "train/epoch_loss": loss_sum / max(seen, 1),
            "train/epoch_acc": correct / max(seen, 1),
            "perf/samples_per_s": seen / elapsed,
            "perf/epoch_time_s": elapsed,
            **peak_memory_mb(replay_model.devices),
        }
        if held is not None:
            metrics["memory/held_for_backward_mb"] = held["total"] / 2**20
            for category in ("activations", "retained_graphs", "history", "stale_gradients"):
                metrics[f"memory/{category}_mb"] = held[category] / 2**20
            for k, module in enumerate(held["modules"], 1):
                metrics[f"memory/module{k}_held_mb"] = module["total"] / 2**20
        if done or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            test_loss, test_acc = evaluate(model, test_loader, augment, accelerator)
            progress.last_acc, progress.best_acc = test_acc, max(progress.best_acc, test_acc)
            metrics.update({"test/loss": test_loss, "test/acc": test_acc, "test/best_acc": progress.best_acc})
        accelerator.log(metrics, step=progress.global_step)
        history.append(metrics)
        accelerator.print(
            f"epoch {epoch + 1}/{args.epochs}  train loss {metrics['train/epoch_loss']:.4f} "
            f"acc {100 * metrics['train/epoch_acc']:.2f}%"
            + (
                f"  test loss {metrics['test/loss']:.4f} acc {100 * metrics['test/acc']:.2f}% "
                f"(best {100 * progress.best_acc:.2f}%)"
                if "test/acc" in metrics
                else ""
            )
            + f"  {metrics['perf/samples_per_s']:.0f} samples/s  {elapsed:.1f} s"
        )
        if "test/loss" in metrics and metrics["test/loss"] > 3 * metrics["train/epoch_loss"] and not bn_note_shown:
            bn_note_shown = True
            accelerator.print(
                "  (a test loss far above the training loss early in training is BatchNorm's running statistics "
                "lagging weights that still move fast: evaluation normalises with them, training with each batch's "
                'own. It settles as the learning rate drops; see docs/recipes.md, "Early test loss".)'
            )
        checkpoints.save(accelerator, progress.global_step)

    results = {
        "model": args.model,
        "dataset": args.dataset,
        "method": args.method,
        "modules": replay_model.num_modules,
        "steps": progress.global_step,
        "best_test_error": 100 * (1 - progress.best_acc),
        "final_test_error": 100 * (1 - progress.last_acc),
        "history": history,
        "train_loss_log": loss_log,
        "diagnostics": probe.records if probe is not None else [],
    }
    accelerator.log(
        {"final/best_test_error": results["best_test_error"], "final/test_error": results["final_test_error"]}
    )
    accelerator.print(
        "\n| Model | Dataset | Method | K | Best test error (%) | Final test error (%) |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.dataset} | {args.method.upper()} | {replay_model.num_modules} "
        f"| {results['best_test_error']:.2f} | {results['final_test_error']:.2f} |"
    )
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        from recipes.plot_results import plot_runs

        plot_runs([results], output_dir / "results.png")
    accelerator.end_training()
    headline = (
        f"final test accuracy {100 * progress.last_acc:.2f}% (best {100 * progress.best_acc:.2f}%) "
        f"after {progress.global_step} steps"
    )
    accelerator.print(summary(headline, output_dir, checkpoints, args.report_to, note, bool(progress.global_step)))
    return results


if __name__ == "__main__":
    main()
