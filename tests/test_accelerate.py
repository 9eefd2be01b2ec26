"""The standard Accelerate loop: prepare, accelerator.backward, step, zero_grad, save_state/load_state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from conftest import max_param_diff, mlp
from torch.utils.data import DataLoader, TensorDataset

from replay_opt import ReplayModelWrapper, ReplayOptimizer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def dataset(n=100):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


def accelerate_run(model, epochs, accelerator, resume_from=None, save_to=None):
    wrapper = ReplayModelWrapper(model, num_modules=3)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9), wrapper)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[40], gamma=0.1)
    loader = DataLoader(dataset(), batch_size=16, shuffle=False)  # 100 rows: a last batch of 4
    wrapper, opt, loader, sched = accelerator.prepare(wrapper, opt, loader, sched)
    if resume_from is not None:
        accelerator.load_state(resume_from)
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(wrapper(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
    if save_to is not None:
        accelerator.save_state(save_to)
    return wrapper, losses


def plain_run(model, epochs):
    wrapper = ReplayModelWrapper(model, num_modules=3)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9), wrapper)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[40], gamma=0.1)
    for _ in range(epochs):
        for x, y in DataLoader(dataset(), batch_size=16):
            F.cross_entropy(wrapper(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()


def test_accelerate_loop_equals_the_plain_loop():
    model = mlp()
    reference = copy.deepcopy(model)
    wrapper, losses = accelerate_run(model, 6, Accelerator(cpu=True))
    plain_run(reference, 6)
    assert isinstance(wrapper, ReplayModelWrapper)  # single process: not wrapped in DDP
    assert max_param_diff(model, reference) <= 1e-6
    assert sum(losses[-7:]) < 0.8 * sum(losses[:7])  # last epoch vs first


def test_save_state_and_load_state_resume_exactly(tmp_path):
    set_seed(0)
    straight = mlp()
    initial = copy.deepcopy(straight)
    accelerate_run(straight, 2, Accelerator(cpu=True))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    first_half = copy.deepcopy(initial)
    accelerate_run(first_half, 1, Accelerator(cpu=True), save_to=tmp_path / "ckpt")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = mlp()  # different initial weights: everything must come from the checkpoint
    accelerate_run(resumed, 1, Accelerator(cpu=True), resume_from=tmp_path / "ckpt")
    assert max_param_diff(straight, resumed) == 0.0


def test_bf16_autocast_trains():
    set_seed(0)
    model = mlp()
    dtypes = set()  # of every linear layer's output, in every module's forward and replay
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    _, losses = accelerate_run(model, 6, Accelerator(cpu=True, mixed_precision="bf16"))
    assert dtypes == {torch.bfloat16}  # autocast was on in the forwards the wrapper ran
    assert sum(losses[-7:]) < 0.8 * sum(losses[:7])


def test_fp16_without_grad_scaler_names_the_fix():
    accelerator = Accelerator(cpu=True)
    AcceleratorState().mixed_precision  # noqa: B018 - state exists
    AcceleratorState._shared_state["_mixed_precision"] = "fp16"
    wrapper = ReplayModelWrapper(mlp(), num_modules=2)
    ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    with pytest.raises(RuntimeError, match="grad_scaler=accelerator.scaler"):
        wrapper(torch.randn(4, 8))
    del accelerator
