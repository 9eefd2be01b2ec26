"""ReplayOptimizer: an Optimizer for schedulers and clipping, and exact resume from state_dict()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, bn_dropout_net, max_param_diff
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def build(model, k=3):
    wrapper = ReplayModelWrapper(model, num_modules=k)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), wrapper)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return wrapper, opt, sched


def train(wrapper, opt, sched, data):
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("resume_at", [1, 6])  # pipeline still filling / full
def test_state_dict_round_trip_resumes_identically(k, resume_at):
    data = batches(12, last=7)
    straight = build(bn_dropout_net(), k)
    train(*straight, data[:resume_at])
    buffer = io.BytesIO()
    torch.save(
        {"model": straight[0].state_dict(), "opt": straight[1].state_dict(), "sched": straight[2].state_dict()}, buffer
    )
    torch.manual_seed(7)
    train(*straight, data[resume_at:])

    resumed = build(bn_dropout_net(), k)  # fresh weights, fresh pipeline
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    torch.manual_seed(7)
    train(*resumed, data[resume_at:])
    assert max_param_diff(straight[0], resumed[0]) == 0.0
    for a, b in zip(straight[0].buffers(), resumed[0].buffers()):
        assert torch.equal(a, b)


def test_state_dict_holds_the_replay_state():
    wrapper, opt, sched = build(bn_dropout_net(), k=3)
    train(wrapper, opt, sched, batches(4))
    replay = opt.state_dict()["replay"]
    assert replay["method"] == "fr" and replay["steps"] == 4
    assert [len(h) for h in replay["histories"]] == [2, 1]  # module k keeps K-k inputs between steps
    assert all(g is not None for g in replay["stale_gradients"])


def test_loading_into_a_different_pipeline_is_an_error():
    wrapper, opt, sched = build(bn_dropout_net(), k=3)
    train(wrapper, opt, sched, batches(2))
    other = build(bn_dropout_net(), k=2)[1]
    with pytest.raises(ValueError, match="num_modules=3"):
        other.load_state_dict(opt.state_dict())


def test_is_an_optimizer_with_closure_and_schedulers():
    wrapper, opt, sched = build(bn_dropout_net())
    assert isinstance(opt, torch.optim.Optimizer)
    x, y = batches(1)[0]

    def closure():
        loss = F.cross_entropy(wrapper(x), y)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(2):
        opt.zero_grad()
        opt.step(closure)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_param_groups_with_different_settings():
    model = bn_dropout_net()
    reference = copy.deepcopy(model)
    groups = lambda m: [  # noqa: E731
        {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
        {"params": [p for n, p in m.named_parameters() if not n.endswith("bias")]},
    ]
    ref_opt = torch.optim.AdamW(groups(reference), lr=1e-2, weight_decay=0.1)
    wrapper = ReplayModelWrapper(model, num_modules=1)
    opt = ReplayOptimizer(torch.optim.AdamW(groups(model), lr=1e-2, weight_decay=0.1), wrapper)
    for x, y in batches(5):
        torch.manual_seed(1)
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
        torch.manual_seed(1)
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert max_param_diff(model, reference) <= 1e-6


def test_grad_scaler_keeps_stale_gradients_consistent_with_the_scale():
    """A scale that doubles every step (growth_interval=1) must not change the result: without
    rescaling, each stale gradient would arrive twice too large."""
    data = batches(8)

    def run(use_scaler: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        wrapper = ReplayModelWrapper(model, num_modules=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1) if use_scaler else None
        opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9), wrapper, grad_scaler=scaler)
        for x, y in data:
            loss = F.cross_entropy(wrapper(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** (4 + len(data))
        return model

    assert max_param_diff(run(False), run(True)) <= 1e-6


def test_skipped_step_discards_its_stale_gradients():
    """zero_grad() without step() (what a GradScaler does on overflow) drops that step's gradients,
    stale ones included; the pipeline then refills from the top."""
    wrapper, opt, _ = build(bn_dropout_net(), k=3)
    data = batches(6)
    for t, (x, y) in enumerate(data):
        F.cross_entropy(wrapper(x), y).backward()
        if t != 3:
            opt.step()
        opt.zero_grad()
        if t == 3:
            assert wrapper.replay_state_dict()["stale_gradients"] == [None, None]
    assert wrapper.replay_state_dict()["steps"] == 5
