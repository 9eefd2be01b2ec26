"""One process per module under a standard Accelerate script: the same result as one process, or a
clear error at the step where it goes wrong.

``tests/accelerate_script.py`` (Accelerate's own examples, changed by the two lines) runs in this
process and, through ``tests/cluster.py``, in two real processes joined by gloo (K=2: rank 0 runs
module 2, rank 1 module 1); what the main process logged and what ``unwrap_model(model)`` holds
are compared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate_script
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from cluster import Cluster, TaskFailed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(2)
    yield c
    c.close()


def single_process(**options):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return accelerate_script.run(**options)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


SAME = {
    # accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler), loss.item() logged on the
    # main process, gather_for_metrics, unwrap_model(model).state_dict()
    "the README loop": {},
    "clip_grad_norm_": {"clip": 0.05},
    "bf16": {"mixed_precision": "bf16"},
    "gradient accumulation": {"accumulation": 2},
    "two backward() with user code between": {"second_backward_after": 0.3},
    "the model computes its own loss": {"own_loss": True},
    "skipping a NaN step the documented way": {"nan_at": 3, "nan_fix": True},
}


@pytest.mark.parametrize("case", list(SAME))
def test_the_same_as_one_process(cluster, case):
    options = SAME[case]
    expected = single_process(**options)
    ranks = cluster.run("accelerate_script:run", **options)
    main = ranks[0]
    assert main["main"] and not ranks[1]["main"]
    assert main["logged"] == pytest.approx(expected["logged"], abs=1e-5)  # the real loss, not a placeholder
    assert main["lrs"] == pytest.approx(expected["lrs"], abs=1e-12)  # the scheduler stepped once per step
    assert (main["accuracy"], main["evaluated"]) == (expected["accuracy"], expected["evaluated"]) == (
        expected["accuracy"], 60)  # fmt: skip
    assert main["dtypes"] == expected["dtypes"] == ["torch.float32"]
    assert main["unwrapped"] == expected["unwrapped"] != "ReplayModelWrapper"
    for rank in ranks:  # every rank's unwrap_model(model).state_dict(): every module's current weights
        assert rank["weights"].keys() == expected["weights"].keys()
        for key, value in expected["weights"].items():
            torch.testing.assert_close(rank["weights"][key], value, rtol=0, atol=1e-5, msg=key)


def test_save_state_and_save_model_resume_and_load(cluster, tmp_path):
    """save_state / load_state and save_model in two processes: the resumed run and the saved model
    are those of the same procedure in one process."""
    cluster.run("accelerate_script:run", epochs=1, scheduler=False, save_dir=str(tmp_path / "a"))
    resumed = cluster.run("accelerate_script:run", epochs=1, scheduler=False, resume_dir=str(tmp_path / "a" / "state"))
    single_process(epochs=1, scheduler=False, save_dir=str(tmp_path / "b"))
    expected = single_process(epochs=1, scheduler=False, resume_dir=str(tmp_path / "b" / "state"))
    for key, value in expected["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][key], value, rtol=0, atol=1e-5, msg=key)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "model" / "model.safetensors")
    accelerate_script.net().load_state_dict(saved)  # the original architecture's keys
    one = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert saved.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(saved[key], one[key], rtol=0, atol=1e-5, msg=key)


FAILS = {
    "evaluating on the main process only": (
        {"eval_on_main_only": True},
        r"rank 0 \(module 2\) is waiting for the activations of an evaluation forward, but rank 1 \(module 1\) is "
        r"waiting at accelerator.wait_for_everyone\(\)",
    ),
    "a rank that never calls optimizer.step()": (
        {"skip_step_on_rank": 1},
        r"has taken \d+ optimizer steps but rank \d has taken \d+: every process must call optimizer.step\(\)",
    ),
    "ranks with different numbers of batches": (
        {"extra_batches_on_rank": 1, "shuffle": False},
        r"must iterate the same batches|must run the same number of training forwards",
    ),
    "skipping a NaN step with continue": ({"nan_at": 3}, r"had no backward\(\).*optimizer\.zero_grad\(\)"),
    "resuming with other split points": ({"split_points": ["2"], "resume_dir": "{saved}"}, r"split_points=\['4'\]"),
}


@pytest.mark.parametrize("case", list(FAILS))
def test_fails_at_once_naming_the_fix(cluster, case, tmp_path):
    options, message = FAILS[case]
    if options.get("resume_dir") == "{saved}":
        cluster.run("accelerate_script:run", epochs=1, save_dir=str(tmp_path))
        options = {**options, "resume_dir": str(tmp_path / "state")}
    with pytest.raises(TaskFailed, match=message) as failed:
        cluster.run("accelerate_script:run", limit=120, **options)
    assert "PipelineError" in str(failed.value) or "ValueError" in str(failed.value) or "RuntimeError" in str(
        failed.value)  # fmt: skip


def test_a_hung_rank_is_reported_within_the_timeout(cluster):
    import time

    start = time.monotonic()
    with pytest.raises(
        TaskFailed,
        match=r"rank 0 \(module 2\) gave up after 3 s waiting for the others to reach "
        r"accelerator.wait_for_everyone\(\): rank 1 sent nothing -- it is stuck",
    ):
        cluster.run("accelerate_script:run", hang_rank=1, timeout=3.0, epochs=1)
    assert time.monotonic() - start < 60


def _launch(*script_args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """``accelerate launch`` of accelerate_script.py, two CPU processes, as a user runs it."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", str(here / "accelerate_script.py"), *script_args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_rank_exits_cleanly_however_the_script_ends_and_a_killed_launchers_ranks_stop(tmp_path):
    """destroy_process_group() or simply returning: every rank leaves together and releases the process group
    (no "terminate called without an active exception" abort after training), with the exact bp pipeline and
    the library's 1F1B schedule.  (Features Replay ending with accelerator.end_training() is the recipe's own
    ending: tests/test_recipe.py's launcher test checks it exits 0 with no abort.)  And kill -9 of `accelerate
    launch` leaves its ranks with nobody to report to: they stop within seconds, not train on.  (The three
    launches run at once.)"""
    endings = {"destroy": "bp", "return": "1f1b"}
    runs = {ending: _launch(f"--ending={ending}", f"--method={method}", "--epochs=1") for ending, method in
            endings.items()}  # fmt: skip
    orphaned = _launch("--epochs=100000", f"--pid-dir={tmp_path}")
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert orphaned.poll() is None and time.monotonic() < deadline, orphaned.communicate()[1][-3000:]
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        time.sleep(1.0)  # training
        assert all(_alive(pid) for pid in pids)
        os.kill(orphaned.pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(_alive(pid) for pid in pids) and time.monotonic() - killed < 15:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "the ranks trained on after their launcher died"
        assert time.monotonic() - killed < 10  # (before: trained on to the end; here 9 processes share 2 cores)
    finally:
        orphaned.kill()
        orphaned.communicate()
        for p in tmp_path.glob("rank*.pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.read_text()), signal.SIGKILL)
    for ending, run in runs.items():
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, (ending, err[-3000:])
        assert "terminate called" not in err and "logged 13 losses" in out, (ending, err[-3000:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    return False
