"""End to end through the real `accelerate launch`: digits, local `datasets` files, W&B offline, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "resnet_cifar.py"
sys.path.insert(0, str(ROOT))
from recipes.data import load_image_data  # noqa: E402


def launch(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    full_env.update({"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}, **(env or {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(RECIPE), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


SMALL = ["--model", "resnet8", "--batch-size", "64", "--lr", "0.05", "--log-every", "4"]


def final_state(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = output_dir / "checkpoints" / (output_dir / "checkpoints" / "latest").read_text()
    return safetensors_torch.load_file(latest / "model.safetensors")


def test_digits_learns_logs_to_wandb_offline_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = launch("--dataset", "digits", *SMALL, "--modules", "2", "--epochs", "3", "--max-steps", "40",
               "--diagnostics-every", "10", "--output-dir", str(out), "--report-to", "wandb",
               env={"HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    losses = [loss for _, loss in results["train_loss_log"]]
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert results["steps"] == 40 and results["method"] == "fr" and results["modules"] == 2
    assert [d["step"] for d in results["diagnostics"]] == [0, 10, 20, 30]
    assert results["diagnostics"][0]["sigma"][0] == 0.0  # module 1 has no gradient at step 0
    assert results["diagnostics"][-1]["sigma"][1] == pytest.approx(1.0, abs=1e-4)  # the last module: true gradient
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "a W&B offline run directory"
    assert "wandb sync" in r.stdout + r.stderr
    assert "| resnet8 | digits | FR | 2 |" in r.stdout
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000023", "step_00000040"]  # 23 steps per epoch; the last at --max-steps
    assert (out / "checkpoints" / "latest").read_text() == "step_00000040"


@pytest.mark.parametrize("stop_at", [23, 9])  # an epoch boundary, and mid-epoch
def test_resume_continues_exactly(tmp_path, stop_at):
    common = ["--dataset", "digits", *SMALL, "--modules", "3", "--epochs", "2", "--report-to", "none"]
    straight = launch(*common, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = launch(*common, "--output-dir", str(tmp_path / "resumed"), "--max-steps", str(stop_at))
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(*common, "--output-dir", str(tmp_path / "resumed"), "--resume-from-checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints'}" in second.stdout
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tiny_image_dataset(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    # Class c has a bright band in column block c: learnable, but only from the image.
    images = rng.integers(0, 60, (rows, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, :, 10 * c : 10 * c + 10] += 150
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return (
        datasets.Dataset.from_dict(
            {"img": [Image.fromarray(im) for im in images], "label": labels.tolist()}, features=features
        ),
        images,
        labels,
    )


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train, train_images, train_labels = tiny_image_dataset(96, 0)
    test, _, _ = tiny_image_dataset(32, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    train.to_parquet(str(root / "parquet" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(root / "parquet" / "test-00000-of-00001.parquet"))
    return root, train_images, train_labels


@pytest.mark.parametrize("form", ["saved", "parquet"])
def test_local_datasets_decode_exactly(local_data, form):
    root, images, labels = local_data
    data = load_image_data(str(root / form))
    assert data.num_classes == 3 and data.train_x.shape == (96, 3, 32, 32) and data.test_x.shape == (32, 3, 32, 32)
    assert torch.equal(data.train_x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(data.train_y, torch.from_numpy(labels))


def test_recipe_on_a_local_dataset(local_data, tmp_path):
    root, _, _ = local_data
    r = launch("--dataset", str(root / "parquet"), "--model", "resnet8", "--batch-size", "32", "--epochs", "2",
               "--method", "bp", "--modules", "2", "--output-dir", str(tmp_path), "--report-to", "none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 6 and len(results["history"]) == 2


@pytest.mark.parametrize(
    ("dataset", "message"),
    [("/nonexistent/cifar", "no saved dataset or parquet files"), ("uoft-cs/cifar10", "not reachable and not cached")],
)
def test_bad_or_unreachable_dataset_fails_fast_naming_the_fix(tmp_path, dataset, message):
    start = time.monotonic()
    r = launch("--dataset", dataset, "--output-dir", str(tmp_path), "--report-to", "none", timeout=120)
    assert r.returncode != 0
    assert message in r.stderr and "--dataset digits" in r.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("method", ["ddg", "dni", "dgl"])
def test_baselines_run_and_log_memory(tmp_path, method):
    r = launch("--dataset", "digits", *SMALL, "--method", method, "--modules", "3", "--max-steps", "4",
               "--output-dir", str(tmp_path), "--report-to", "none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    epoch = json.loads((tmp_path / "results.json").read_text())["history"][-1]
    assert epoch["memory/held_for_backward_mb"] > 0
    assert sum(epoch[f"memory/module{k}_held_mb"] for k in (1, 2, 3)) == pytest.approx(
        epoch["memory/held_for_backward_mb"]
    )
    if method == "ddg":
        assert epoch["memory/retained_graphs_mb"] > 0


def launch_processes(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with n gloo processes on CPU, the documented way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), str(RECIPE)]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_one_process_per_module_trains_and_resumes_exactly(tmp_path):
    common = ["--dataset", "digits", *SMALL, "--modules", "2", "--epochs", "2", "--report-to", "none"]
    straight = launch_processes(2, *common, "--max-steps", "30", "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "replica 0: module 1: rank 0, module 2: rank 1" in straight.stdout
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    losses = [loss for _, loss in results["train_loss_log"]]  # the last module's loss, logged by rank 0
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) and results["steps"] == 30
    assert 0 < results["final_test_error"] < 100
    first = launch_processes(2, *common, "--max-steps", "12", "--output-dir", str(tmp_path / "resumed"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch_processes(2, *common, "--max-steps", "30", "--output-dir", str(tmp_path / "resumed"),
                              "--resume-from-checkpoint", "latest")  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
