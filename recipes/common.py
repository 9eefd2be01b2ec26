"""What the recipes share: the Accelerator they run under, W&B without credentials, progress, the summary."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import resource
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import set_seed

from recipes.checkpoints import CheckpointError, Checkpoints, load


def add_method_arguments(p: argparse.ArgumentParser, methods: tuple[str, ...]) -> argparse._ArgumentGroup:
    """The flags both recipes take to choose the method and the cut; returns the group for more."""
    g = p.add_argument_group("method")
    g.add_argument(
        "--method", choices=methods, default="fr",
        help="training method (bp = plain backprop; gpipe/1f1b = exact micro-batched pipelining, a process per module)",
    )  # fmt: skip
    g.add_argument("--microbatches", type=int, default=None, help="M for gpipe/1f1b (default 2 x modules)")
    g.add_argument("--modules", type=int, default=2, help="K, the number of pipeline modules")
    g.add_argument("--split-points", default=None, help="comma-separated submodule names where modules 2..K begin")
    g.add_argument(
        "--compensation",
        default=None,
        type=lambda v: None if v == "none" else v,
        help="staleness compensation for fr/ddg: spike, lwp, warmup[:T], predict, momentum, combined with + "
        "(e.g. spike+warmup:500); none turns it off",
    )
    return g


def add_run_arguments(g: argparse._ArgumentGroup, output_dir: str) -> None:
    """Output, checkpoints, multi-process timeout and tracking: the same flags in both recipes."""
    g.add_argument("--output-dir", default=output_dir)
    g.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint directory, or 'latest'")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--overwrite", action="store_true", help="delete another run's checkpoints in --output-dir")
    g.add_argument(
        "--timeout", type=float, default=600, help="seconds any wait on another process may take (multi-process)"
    )
    g.add_argument("--report-to", choices=("wandb", "tensorboard", "none"), default="wandb")
    g.add_argument("--wandb-project", default="replay_opt")


class _TiedWeightsSaved(logging.Filter):
    """Accelerate warns on every checkpoint of a model with tied weights (GPT-2's embedding and LM head)
    that it stored the shared tensor once and asks to check the reload; the recipes' resume tests
    check exactly that (bit-identical), so the warning is dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsSaved())


def begin_run(args: argparse.Namespace) -> tuple[Path, str | None, Accelerator, Checkpoints]:
    """A recipe run's beginning: its output directory, W&B offline when there are no credentials (the
    note to print), the Accelerator, the seed, and the checkpoint folder (refusing another run's)."""
    output_dir = Path(args.output_dir)
    note = use_wandb_offline_without_credentials() if args.report_to == "wandb" else None
    accelerator = accelerator_for(args.report_to, output_dir, args.timeout)
    set_seed(args.seed)
    try:
        checkpoints = Checkpoints(
            output_dir / "checkpoints", args.keep_checkpoints, resuming=bool(args.resume_from_checkpoint),
            overwrite=args.overwrite, is_main=accelerator.is_main_process,
        )  # fmt: skip
    except CheckpointError as exc:
        args.parser.error(str(exc))
    return output_dir, note, accelerator, checkpoints


def accelerator_for(report_to: str, output_dir: Path, timeout: float) -> Accelerator:
    """The recipes' Accelerator: trackers, a seedable sampler, and every wait on another process bounded."""
    accelerator = Accelerator(
        log_with=None if report_to == "none" else report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Every wait on another process is bounded (torch's default is 30 minutes).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout))],
    )
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        raise SystemExit(
            f"torch.distributed runs {torch.distributed.get_world_size()} processes but Accelerate sees "
            f"{accelerator.num_processes}: on a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
            "(ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes K ..., "
            "or ACCELERATE_USE_CPU=1 torchrun ...)"
        )
    return accelerator


def use_wandb_offline_without_credentials() -> str | None:
    """wandb blocks on a login prompt when it has no key: go offline by ourselves and say how to sync."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return None
    os.environ["WANDB_MODE"] = "offline"
    return "no W&B credentials found: logging offline; upload later with `wandb sync {dir}/wandb/offline-run-*`"


def peak_memory_mb(devices: list[torch.device]) -> dict[str, float]:
    peaks = {}
    for device in sorted(set(devices), key=str):
        if device.type == "cuda":
            peaks[f"memory/peak_mb_{device}"] = torch.cuda.max_memory_allocated(device) / 2**20
    peaks["memory/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peaks


class Progress:
    """Where training stands; saved with every checkpoint so a resume continues at the same batch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_acc = 0.0
        self.last_acc = 0.0
        self.best_loss = float("inf")
        self.last_loss = float("inf")

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def progress_resumed(accelerator: Accelerator, args: argparse.Namespace, output_dir: Path) -> Progress:
    """The run's ``Progress``, saved with every checkpoint; with ``--resume-from-checkpoint``, everything
    registered with ``accelerator`` (model, optimizer, scheduler, RNG, progress) is loaded from it."""
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume_from_checkpoint:
        checkpoint = load(accelerator, args.resume_from_checkpoint, output_dir / "checkpoints", args.parser.error)
        accelerator.print(f"resumed from {checkpoint} at epoch {progress.epoch}, step {progress.global_step}")
    return progress


def start_tracking(
    accelerator: Accelerator,
    args: argparse.Namespace,
    output_dir: Path,
    note: str | None,
    run_name: str,
    replay_model: Any,
    **config: Any,
) -> None:
    """Trackers (W&B / TensorBoard) with the run's flags and ``config``; the offline note and the cut printed."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)  # W&B's `dir` must exist (else it warns about a git root)
    flags = {k: v for k, v in vars(args).items() if k != "parser"}
    accelerator.init_trackers(
        args.wandb_project, config={**flags, "split_points": replay_model.split_points, **config},
        init_kwargs={"wandb": {"name": run_name, "dir": str(output_dir)}},
    )  # fmt: skip
    if note:
        accelerator.print(note.format(dir=output_dir))
    accelerator.print(replay_model.describe())


def summary(headline: str, output_dir: Path, checkpoints: Any, report_to: str, note: str | None, saved: bool) -> str:
    """The end of a run: what it reached, and where the results, plot, checkpoints and W&B run are."""
    lines = [
        headline,
        f"  results:     {output_dir / 'results.json'}",
        f"  plot:        {output_dir / 'results.png'}",
    ]
    if saved:
        lines.append(f"  checkpoints: {output_dir / 'checkpoints'} (latest: {checkpoints.root / 'latest'}; "
                     "resume with --resume-from-checkpoint latest)")  # fmt: skip
    if report_to == "wandb":
        sync = f" -- {note.split(';')[1].strip().format(dir=output_dir)}" if note else ""
        lines.append(f"  W&B run:     {output_dir / 'wandb'}{sync}")
    return "\n".join(lines)
