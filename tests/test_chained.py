"""Several optimizers as one: ``ReplayOptimizer([muon, adamw], model)`` against the two stepped by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import batches, max_param_diff, mlp
from naive import naive_features_replay, sequential_stages

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.chained import ChainedOptimizer

SPLIT = [4, 8]


def muon_and_adamw(params):
    """Muon on the 2-D weights, AdamW on the biases: the split LM users run (hidden matrices / the rest)."""
    params = list(params)
    muon = torch.optim.Muon([p for p in params if p.ndim == 2], lr=0.02, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for p in params if p.ndim != 2], lr=0.02, weight_decay=0.1)
    return muon, adamw


class BothByHand:
    """Step and zero the two optimizers one after the other: the chain written out."""

    def __init__(self, params) -> None:
        self.opts = muon_and_adamw(params)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad()


def test_features_replay_with_muon_and_adamw_matches_the_naive_algorithm():
    """Per module, each parameter moves by its own optimizer: the naive Algorithm 1 with Muon + AdamW per module."""
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(8)
    naive_features_replay(sequential_stages(reference, SPLIT), data, BothByHand)
    wrapper = ReplayModelWrapper(model, split_points=[str(i) for i in SPLIT])
    opt = ReplayOptimizer(list(muon_and_adamw(wrapper.parameters())), wrapper)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert isinstance(opt.optimizer, ChainedOptimizer)
    assert max_param_diff(model, reference) <= 1e-5
    assert {type(o).__name__ for o in opt.optimizer.optimizers} == {"Muon", "AdamW"}


def test_state_dict_has_torch_layout_and_resumes_exactly():
    """Positions run on from one optimizer to the next; a scheduler and a round trip resume bit for bit."""

    def build(model):
        wrapper = ReplayModelWrapper(model, split_points=[str(i) for i in SPLIT])
        opt = ReplayOptimizer(list(muon_and_adamw(wrapper.parameters())), wrapper, compensation="predict")
        return wrapper, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)

    def train(wrapper, opt, sched, part):
        for x, y in part:
            F.cross_entropy(wrapper(x), y).backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    data = batches(8)
    torch.manual_seed(0)
    straight = mlp(depth=6)
    first = copy.deepcopy(straight)
    train(*build(straight), data)
    wrapper, opt, sched = build(first)
    train(wrapper, opt, sched, data[:4])
    saved = copy.deepcopy((wrapper.state_dict(), opt.state_dict(), sched.state_dict()))
    n_weights = sum(p.ndim == 2 for p in first.parameters())
    assert [g["params"] for g in saved[1]["param_groups"]] == [
        list(range(n_weights)), list(range(n_weights, len(list(first.parameters()))))]  # fmt: skip
    assert "momentum_buffer" in saved[1]["state"][0] and "exp_avg" in saved[1]["state"][n_weights]
    resumed = mlp(depth=6)
    wrapper, opt, sched = build(resumed)
    wrapper.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    train(wrapper, opt, sched, data[4:])
    assert max_param_diff(straight, resumed) == 0.0
    other = ReplayModelWrapper(mlp(depth=6), split_points=["4"])
    with pytest.raises(ValueError, match="2 parameter groups.*3.*same optimizers"):
        muon, _ = muon_and_adamw(other.parameters())
        biases = [p for p in other.parameters() if p.ndim != 2]
        chain = [muon, torch.optim.AdamW(biases[:2]), torch.optim.AdamW(biases[2:])]
        ReplayOptimizer(chain, other, compensation="predict").load_state_dict(saved[1])


def test_accelerate_prepares_and_checkpoints_the_chain(tmp_path):
    """``accelerator.prepare`` and ``save_state``/``load_state``: the resumed run ends where the straight one does."""

    def run(model, part, load=None, save=None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        wrapper = ReplayModelWrapper(model, split_points=[str(i) for i in SPLIT])
        opt = ReplayOptimizer(list(muon_and_adamw(wrapper.parameters())), wrapper)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        wrapper, opt, sched = accelerator.prepare(wrapper, opt, sched)
        if load is not None:
            accelerator.load_state(load)
        for x, y in part:
            accelerator.backward(F.cross_entropy(wrapper(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()
        if save is not None:
            accelerator.save_state(save)

    data = batches(6)
    straight = mlp(depth=6)
    first, resumed = copy.deepcopy(straight), mlp(depth=6)
    try:
        run(straight, data)
        run(first, data[:3], save=tmp_path / "ckpt")
        run(resumed, data[3:], load=tmp_path / "ckpt")
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert max_param_diff(straight, resumed) == 0.0


def test_bad_chains_name_the_fix():
    wrapper = ReplayModelWrapper(mlp(depth=6), split_points=["4"])
    params = list(wrapper.parameters())
    with pytest.raises(ValueError, match="in optimizers 0 and 1; give each parameter to one optimizer"):
        ReplayOptimizer([torch.optim.SGD(params, lr=0.1), torch.optim.AdamW(params[:1])], wrapper)
    with pytest.raises(TypeError, match="optimizer 1 of the list is a list"):
        ReplayOptimizer([torch.optim.SGD(params[:1], lr=0.1), [params[1]]], wrapper)
    with pytest.raises(ValueError, match="empty list of optimizers"):
        ReplayOptimizer([], wrapper)
    opt = ReplayOptimizer(list(muon_and_adamw(params)), wrapper)
    with pytest.raises(ValueError, match="add the parameter group to one of the chained optimizers"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
