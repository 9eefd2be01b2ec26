"""Checkpoints that a crash, a second run or a damaged file cannot lose or silently corrupt.

``outputs/RUN/checkpoints/`` holds one run's checkpoints, ``step_00000040/`` and so on:

* each is written by ``accelerator.save_state`` into a hidden temporary directory, given a
  ``manifest.json`` (size and SHA-256 of every file), then renamed into place, and ``latest``
  names it -- a crash mid-write leaves the previous checkpoint intact;
* ``run.json`` identifies the run that owns the folder: a new run (no ``--resume-from-checkpoint``)
  in a folder holding another run's checkpoints is refused (``--overwrite`` deletes them), so
  two runs never mix, and pruning -- by step number, keeping the newest ``keep`` -- only ever
  sees this run's;
* ``resolve`` checks a checkpoint against its manifest before resuming: a missing, truncated or
  altered file names the checkpoint, the file, and the newest earlier checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    pass


class Checkpoints:
    def __init__(self, root: Path, keep: int, *, resuming: bool, overwrite: bool, is_main: bool) -> None:
        self.root = root
        self.keep = max(1, keep)
        self.is_main = is_main
        identity = root / "run.json"
        if is_main:
            existing = self.all()
            if existing and not resuming:
                if not overwrite:
                    raise CheckpointError(
                        f"{root} holds checkpoints of another run ({existing[0].name} .. {existing[-1].name}): "
                        "continue it with --resume-from-checkpoint latest, choose another --output-dir, or pass "
                        "--overwrite to delete them"
                    )
                shutil.rmtree(root)
            root.mkdir(parents=True, exist_ok=True)
            if not identity.exists() or not resuming:
                _write_json(identity, {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def all(self) -> list[Path]:
        return checkpoints_in(self.root)

    def save(self, accelerator: Any, step: int) -> Path:
        """``save_state`` into a temporary directory, add the manifest, rename; prune to ``keep``."""
        final, tmp = self.root / f"step_{step:08d}", self.root / f".step_{step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if self.is_main:
            _write_json(tmp / MANIFEST, {"step": step, "files": _describe(tmp)})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (self.root / "latest.tmp").write_text(final.name)
            os.replace(self.root / "latest.tmp", self.root / "latest")
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final


def load(accelerator: Any, arg: str, root: Path, error: Callable[[str], Any]) -> Path:
    """Load the checkpoint ``--resume-from-checkpoint`` names into everything registered with ``accelerator``;
    a missing or damaged one goes to ``error`` (the argument parser's) with the fix."""
    try:
        checkpoint = resolve(arg, root)
    except CheckpointError as exc:
        error(str(exc))
    accelerator.load_state(str(checkpoint))
    return checkpoint


def resolve(arg: str, root: Path) -> Path:
    """The checkpoint ``--resume-from-checkpoint`` names (a directory, or ``latest``), verified."""
    path = Path(arg)
    if arg == "latest":
        pointer = root / "latest"
        if not pointer.exists():
            raise CheckpointError(f"--resume-from-checkpoint latest: no checkpoint under {root}")
        path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"--resume-from-checkpoint {arg}: {path} is not a checkpoint directory")
    problem = verify(path)
    if problem:
        earlier = [p for p in checkpoints_in(path.parent) if int(p.name[5:]) < int(path.name[5:]) and not verify(p)]
        hint = (
            f"; the newest intact earlier checkpoint is {earlier[-1]}: --resume-from-checkpoint {earlier[-1]}"
            if earlier
            else "; no intact earlier checkpoint is left"
        )
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{hint}")
    return path


def verify(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None if every file matches its manifest."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return f"{MANIFEST} is missing (an interrupted or foreign checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written (truncated or extended)"
        if _sha256(f) != expected["sha256"]:
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def checkpoints_in(root: Path) -> list[Path]:
    """The checkpoints in ``root``, oldest first (by step number, not by name)."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _describe(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
