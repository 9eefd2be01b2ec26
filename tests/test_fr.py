"""Features Replay against an independent, naive implementation of Algorithm 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, max_param_diff, mlp
from naive import SmallResNet, naive_features_replay, sequential_stages
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def run_library(model, data, make_opt, compensation=None, **wrap):
    wrapper = ReplayModelWrapper(model, **wrap)
    opt = ReplayOptimizer(make_opt(wrapper.parameters()), wrapper, compensation=compensation)
    for x, y in data:
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return wrapper


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_matches_naive_algorithm_1(k, opt):
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    split = {2: [6], 3: [4, 8], 4: [2, 6, 8]}[k]
    data = batches(10, last=5)  # the last batch is smaller
    naive_features_replay(sequential_stages(reference, split), data, OPTIMIZERS[opt])
    run_library(model, data, OPTIMIZERS[opt], split_points=[str(i) for i in split])
    assert max_param_diff(model, reference) <= 1e-6


@pytest.mark.parametrize("k", [2, 3, 4])
def test_module_k_first_updates_at_step_k_minus_k(k):
    """No weight decay, momentum or Adam step count before a module's first (input, gradient) pair."""
    model = mlp(depth=4)
    wrapper = ReplayModelWrapper(model, split_points=[str(i) for i in (2, 4, 6)[: k - 1]])
    opt = ReplayOptimizer(torch.optim.AdamW(wrapper.parameters(), lr=1e-2, weight_decay=0.1), wrapper)
    first_update = {}
    for t, (x, y) in enumerate(batches(k + 1)):
        before = [[p.clone() for p in s.parameters()] for s in wrapper.stages]
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
        for i, stage in enumerate(wrapper.stages):
            moved = any(not torch.equal(a, b) for a, b in zip(before[i], stage.parameters()))
            if moved:
                first_update.setdefault(i, t)
            elif i not in first_update:
                assert all(p not in opt.state for p in stage.parameters()), "no optimizer state before the first update"
    assert first_update == {i: k - (i + 1) for i in range(k)}


def test_optimizer_built_before_wrapping_and_in_place_training():
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built on the original model
    wrapper = ReplayModelWrapper(model, split_points=["4"])
    ropt = ReplayOptimizer(opt, wrapper)
    data = batches(6)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        ropt.step()
        ropt.zero_grad()
    naive_features_replay(sequential_stages(reference, [4]), data, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert wrapper.module is model
    assert max_param_diff(model, reference) <= 1e-6
    assert list(wrapper.state_dict()) == list(model.state_dict())  # the model's own keys: loads into it
    twin = mlp()
    twin.load_state_dict(wrapper.state_dict())
    assert max_param_diff(model, twin) == 0
    prefixed = {f"module.{k}": v.clone() for k, v in twin.state_dict().items()}  # a DDP-style save loads too
    wrapper.load_state_dict(prefixed)


def test_eval_in_between_is_plain_inference_and_pipeline_continues():
    model = mlp()
    reference = copy.deepcopy(model)
    data = batches(8)
    wrapper = ReplayModelWrapper(model, split_points=["2", "6"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    probe = torch.randn(5, 8)
    for t, (x, y) in enumerate(data):
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
        if t in (1, 4):
            state = copy.deepcopy(wrapper.replay_state_dict())
            wrapper.eval()
            out = wrapper(probe)
            assert torch.allclose(out, model(probe))
            with torch.no_grad():
                wrapper(probe)
            wrapper.train()
            with torch.no_grad():  # train mode without gradients is inference too
                wrapper(probe)
            after = wrapper.replay_state_dict()
            assert after["steps"] == state["steps"]
            for h0, h1 in zip(state["histories"], after["histories"]):
                assert len(h0) == len(h1)
                for e0, e1 in zip(h0, h1):
                    assert all(torch.equal(a, b) for a, b in zip(e0["inputs"], e1["inputs"]))
    naive_features_replay(sequential_stages(reference, [2, 6]), data, lambda p: torch.optim.SGD(p, lr=0.1))
    assert max_param_diff(model, reference) <= 1e-6


def test_forward_without_backward_is_an_error():
    wrapper = ReplayModelWrapper(mlp(), num_modules=2)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    x, y = batches(1)[0]
    F.cross_entropy(wrapper(x), y).backward()
    opt.step()
    wrapper(x)  # no backward
    with pytest.raises(RuntimeError, match="followed by backward"):
        wrapper(x)


def test_training_without_replay_optimizer_is_an_error():
    wrapper = ReplayModelWrapper(mlp(), num_modules=2)
    with pytest.raises(RuntimeError, match="ReplayOptimizer"):
        wrapper(torch.randn(2, 8))


def test_loss_on_any_output_tensor_delivers_stale_gradients_once():
    """A tuple output whose loss uses only the second tensor still drives the replays, exactly once."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp(depth=4, classes=16)
            self.a = nn.Linear(16, 4)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            h = self.body(x)
            return self.a(h), self.b(h)

    model = TwoHeads()
    wrapper = ReplayModelWrapper(model, split_points=["body.4", "a"])
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for x, y in batches(4):
        _, out_b = wrapper(x)
        F.cross_entropy(out_b, y).backward()
        opt.step()
        opt.zero_grad()
    # Same step twice from the same state: loss on one head, then on both heads.  Module 1's
    # gradient comes only from its replay and the stale gradient, so it must not change (not doubled).
    x, y = batches(1, seed=1)[0]
    grads = []
    for heads in ((1,), (0, 1)):
        w, _ = copy.deepcopy((wrapper, opt))
        outs = w(x)
        sum(F.cross_entropy(outs[h], y) for h in heads).backward()
        grads.append(w.module.body[0].weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_explicit_per_module_placement():
    """The multi-device code path (explicit devices, transfers, stage-wise inference) on CPU devices."""
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(8, last=3)
    naive_features_replay(sequential_stages(reference, [4, 8]), data, OPTIMIZERS["sgd"])
    wrapper = ReplayModelWrapper(model, split_points=["4", "8"], devices=["cpu", "cpu", "cpu"])
    wrapper.to("meta")  # what accelerator.prepare does to a model: the placement must survive it
    assert wrapper.devices == [torch.device("cpu")] * 3
    assert all(p.device.type == "cpu" for p in model.parameters())
    opt = ReplayOptimizer(OPTIMIZERS["sgd"](wrapper.parameters()), wrapper)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert max_param_diff(model, reference) <= 1e-6
    wrapper.eval()
    probe = torch.randn(3, 8)
    torch.testing.assert_close(wrapper(probe), model(probe))
    wrapper.to(torch.float64)  # dtype changes still apply
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("k", [2, 3])
def test_traced_resnet_matches_naive_algorithm_1(k):
    """The torch.fx path with BatchNorm and residuals against hand-built stages of a copy."""
    model = SmallResNet()
    ref = copy.deepcopy(model)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), ref.fc)
    stem = [ref.conv, ref.bn, nn.ReLU()]
    if k == 2:
        stages = [nn.Sequential(*stem, *ref.blocks[:3]), nn.Sequential(ref.blocks[3], head)]
        split = ["blocks.3"]
    else:
        stages = [
            nn.Sequential(*stem, ref.blocks[0]),
            nn.Sequential(*ref.blocks[1:3]),
            nn.Sequential(ref.blocks[3], head),
        ]
        split = ["blocks.1", "blocks.3"]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(6)]

    def make_opt(p):
        return torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)

    naive_features_replay(stages, data, make_opt)
    run_library(model, data, make_opt, split_points=split)
    assert max_param_diff(model, ref) <= 1e-5
