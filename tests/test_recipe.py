"""The ResNet recipe end to end: digits, local `datasets` files, W&B offline, checkpoints, resume.

Most runs call ``recipes.resnet_cifar.main`` in this process (the code `accelerate launch` runs,
without starting an interpreter); one goes through the real `accelerate launch` (two processes
with gloo), and the multi-process resume runs in ``tests/cluster.py`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

datasets = pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "resnet_cifar.py"
sys.path.insert(0, str(ROOT))
from recipes.data import load_image_data  # noqa: E402
from recipes.resnet_cifar import main  # noqa: E402

SMALL = ["--dataset", "digits", "--model", "resnet8", "--batch-size", "64", "--lr", "0.05", "--log-every", "4",
         "--report-to", "none"]  # fmt: skip


def run(*args: str, main=main) -> dict:
    """A recipe's ``main`` in this process, as `accelerate launch` would run it in one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return main([*args])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def launch(*args: str, processes: int = 1, env: dict[str, str] | None = None, timeout: int = 300, script=RECIPE):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    full_env.update({"OMP_NUM_THREADS": "1" if processes > 1 else "2", "PYTHONUNBUFFERED": "1"}, **(env or {}))
    if processes > 1:  # the documented way on CPU
        full_env["ACCELERATE_USE_CPU"] = "1"
        flags = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, str(ROOT / script), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def final_state(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = output_dir / "checkpoints" / (output_dir / "checkpoints" / "latest").read_text()
    return safetensors_torch.load_file(latest / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = final_state(a), final_state(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
def test_the_launcher_runs_one_process_per_module_logs_to_wandb_offline_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = launch(*SMALL[:-2], "--modules", "2", "--epochs", "3", "--max-steps", "24", "--output-dir", str(out),
               "--report-to", "wandb", processes=2, env={"HOME": str(tmp_path)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replica 0: module 1: rank 1, module 2: rank 0" in r.stdout
    assert "terminate called" not in r.stderr
    results = json.loads((out / "results.json").read_text())
    losses = [loss for _, loss in results["train_loss_log"]]
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    assert results["steps"] == 24 and results["method"] == "fr" and results["modules"] == 2
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "one W&B offline run directory (the main process's)"
    assert "wandb sync" in r.stdout + r.stderr
    assert "| resnet8 | digits | FR | 2 |" in r.stdout
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000023", "step_00000024"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000024"
    for where in ("results.json", "results.png", "checkpoints", "wandb"):
        assert str(out / where) in r.stdout  # the end of the run says where everything is
    assert (out / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """Stopped mid-epoch (5) and at an epoch boundary (12), resumed: the weights of the straight run."""
    common = [*SMALL, "--modules", "3", "--epochs", "2", "--batch-size", "128"]  # 12 steps per epoch
    run(*common, "--output-dir", str(tmp_path / "straight"))
    for stop_at in (5, 12):
        resumed = tmp_path / f"resumed_{stop_at}"
        run(*common, "--output-dir", str(resumed), "--max-steps", str(stop_at))
        run(*common, "--output-dir", str(resumed), "--resume-from-checkpoint", "latest")
        assert_same_weights(tmp_path / "straight", resumed)


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
    results = run("--dataset", str(root / "parquet"), "--model", "resnet8", "--batch-size", "32", "--epochs", "2",
                  "--method", "bp", "--modules", "2", "--output-dir", str(tmp_path), "--report-to", "none")  # fmt: skip
    assert results["steps"] == 6 and len(results["history"]) == 2


@pytest.mark.parametrize(
    ("dataset", "message"),
    [("/nonexistent/cifar", "no saved dataset or parquet files"), ("uoft-cs/cifar10", "not reachable and not cached")],
)
def test_bad_or_unreachable_dataset_fails_fast_naming_the_fix(tmp_path, capsys, dataset, message):
    start = time.monotonic()
    with pytest.raises(SystemExit):
        run("--dataset", dataset, "--output-dir", str(tmp_path), "--report-to", "none")
    err = capsys.readouterr().err
    assert message in err and "--dataset digits" in err
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("method", ["ddg", "dni", "dgl"])
def test_baselines_run_and_log_memory(tmp_path, method):
    results = run(*SMALL, "--method", method, "--modules", "3", "--max-steps", "4", "--output-dir", str(tmp_path))
    epoch = results["history"][-1]
    assert epoch["memory/held_for_backward_mb"] > 0
    assert sum(epoch[f"memory/module{k}_held_mb"] for k in (1, 2, 3)) == pytest.approx(
        epoch["memory/held_for_backward_mb"]
    )
    if method == "ddg":
        assert epoch["memory/retained_graphs_mb"] > 0


# --------------------------------------------------------------------------- checkpoints


QUICK = [*SMALL, "--modules", "2", "--batch-size", "256", "--eval-every", "0"]  # 6 steps per epoch


@pytest.mark.slow
def test_a_new_run_never_mixes_with_another_runs_checkpoints(tmp_path, capsys):
    out = str(tmp_path)
    run(*QUICK, "--epochs", "2", "--keep-checkpoints", "1", "--output-dir", out)  # step_00000012
    with pytest.raises(SystemExit):  # a new run here would prune the older run's higher-numbered checkpoints
        run(*QUICK, "--max-steps", "3", "--output-dir", out)
    err = capsys.readouterr().err
    assert "holds checkpoints of another run" in err and "--overwrite" in err and "--resume-from-checkpoint" in err
    run(*QUICK, "--epochs", "2", "--max-steps", "9", "--keep-checkpoints", "1", "--output-dir", out, "--overwrite")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000009"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000009"


@pytest.mark.slow
def test_pruning_keeps_this_runs_newest_by_step_number_and_sigma_is_measured(tmp_path):
    from recipes.checkpoints import checkpoints_in

    results = run(*QUICK, "--epochs", "3", "--keep-checkpoints", "2", "--diagnostics-every", "12",
                  "--output-dir", str(tmp_path))  # fmt: skip
    assert [p.name for p in checkpoints_in(tmp_path / "checkpoints")] == ["step_00000012", "step_00000018"]
    # (the same run measures sigma: --diagnostics-every)
    assert [d["step"] for d in results["diagnostics"]] == [0, 12]
    assert np.isnan(results["diagnostics"][0]["sigma_staleness"][0])  # module 1 has not started at step 0
    last = results["diagnostics"][-1]
    assert last["sigma_staleness"][1] == pytest.approx(1.0, abs=1e-4)  # the last module: no staleness
    assert all(np.isfinite(last["sigma_expected"]))


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """The output folder of a two-epoch run with its two checkpoints (step 6 and step 12)."""
    out = tmp_path_factory.mktemp("two_epochs")
    run(*QUICK, "--epochs", "2", "--keep-checkpoints", "2", "--output-dir", str(out))
    return out


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_checkpoint_is_detected_naming_the_last_good_one(two_epochs, tmp_path, capsys, damage):
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    out = str(tmp_path)
    weights = tmp_path / "checkpoints" / "step_00000012" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "random bytes":
        data[len(data) // 2 : len(data) // 2 + 8] = os.urandom(8)
        weights.write_bytes(bytes(data))
    else:
        weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(SystemExit):
        run(*QUICK, "--epochs", "3", "--output-dir", out, "--resume-from-checkpoint", "latest")
    err = capsys.readouterr().err
    expected = "does not match its checksum" if damage == "random bytes" else "truncated or extended"
    assert "step_00000012 is damaged: model.safetensors" in err and expected in err
    assert "the newest intact earlier checkpoint is" in err and "step_00000006" in err


# --------------------------------------------------------------------------- one process per module


@pytest.mark.slow
def test_one_process_per_module_trains_and_resumes_exactly(tmp_path, cpu_cluster):
    common = [*SMALL, "--modules", "2", "--epochs", "2", "--batch-size", "128"]  # 12 steps per epoch
    run_ = "recipes.resnet_cifar:main"
    # Stop in mid-epoch (5), resume across the epoch boundary (12) to step 14.
    straight = cpu_cluster.run(run_, argv=[*common, "--max-steps", "14", "--output-dir", str(tmp_path / "straight")])
    cpu_cluster.run(run_, argv=[*common, "--max-steps", "5", "--output-dir", str(tmp_path / "resumed")])
    cpu_cluster.run(run_, argv=[*common, "--max-steps", "14", "--output-dir", str(tmp_path / "resumed"),
                                "--resume-from-checkpoint", "latest"])  # fmt: skip
    losses = [loss for _, loss in straight[0]["train_loss_log"]]  # the last module's loss, logged by rank 0
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) and straight[0]["steps"] == 14
    for h0, h1 in zip(straight[0]["history"], straight[1]["history"]):  # every rank reports the last module's metrics
        assert {k: v for k, v in h0.items() if k.startswith(("train/", "test/"))} == {
            k: v for k, v in h1.items() if k.startswith(("train/", "test/"))}  # fmt: skip
    assert 0 < straight[0]["final_test_error"] < 100
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
