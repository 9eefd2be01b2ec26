"""Staleness compensation against hand-written references (momentum SGD written out in the test)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, max_param_diff, mlp
from naive import naive_features_replay, sequential_stages
from test_fr import run_library
from torch import nn
from torch.func import functional_call

from replay_opt import ReplayModelWrapper, ReplayOptimizer

LR, M, WD = 0.1, 0.9, 5e-4
SPLIT = {2: [6], 3: [4, 8]}


class HandSGD:
    """Momentum SGD with spike compensation for delay D and a per-module warm-up, written out by hand."""

    def __init__(self, params, delay: int, spike: bool, clock: list[int] | None = None, warmup: int = 0):
        self.params, self.delay, self.spike, self.clock, self.warmup = list(params), delay, spike, clock, warmup
        self.v: dict[int, torch.Tensor] = {}

    def lr(self) -> float:
        t = self.clock[0] if self.clock is not None else 0
        if self.warmup and self.delay and t < self.warmup:
            return LR * (1 + self.delay) ** -(1 - t / self.warmup)
        return LR

    def step(self) -> None:
        a, b = (M**self.delay, (1 - M**self.delay) / (1 - M)) if self.spike else (1.0, 0.0)
        lr = self.lr()
        with torch.no_grad():
            for p in self.params:
                d = p.grad + WD * p
                v = d.clone() if id(p) not in self.v else M * self.v[id(p)] + d
                self.v[id(p)] = v
                p -= lr * (a * v + b * d)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def hand_optimizers(k: int, spike: bool, warmup: int = 0):
    """A factory for naive_features_replay: module i gets delay K-1-i; the last module's step ticks the clock."""
    made: list[HandSGD] = []
    clock = [-1]

    def make(params):
        i = len(made)
        opt = HandSGD(params, k - 1 - i, spike, clock, warmup)
        if i == k - 1:  # the last module steps first, every step: it advances the clock
            step = opt.step

            def tick():
                clock[0] += 1
                step()

            opt.step = tick
        made.append(opt)
        return opt

    return make


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=M, weight_decay=WD)


@pytest.mark.parametrize("k", [2, 3])
def test_spike_compensation_matches_the_hand_written_update(k):
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(9, last=5)
    naive_features_replay(sequential_stages(reference, SPLIT[k]), data, hand_optimizers(k, spike=True))
    run_library(model, data, sgd, compensation="spike", split_points=[str(i) for i in SPLIT[k]])
    assert max_param_diff(model, reference) <= 1e-5


def test_warmup_matches_the_hand_written_schedule():
    k = 3
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(8)
    naive_features_replay(sequential_stages(reference, SPLIT[k]), data, hand_optimizers(k, spike=False, warmup=5))
    run_library(model, data, sgd, compensation="warmup:5", split_points=[str(i) for i in SPLIT[k]])
    assert max_param_diff(model, reference) <= 1e-5


class Predicted(nn.Module):
    """A module run with its weights extrapolated D steps along the momentum (read from a HandSGD)."""

    def __init__(self, module: nn.Module, opt: HandSGD) -> None:
        super().__init__()
        self.module, self.opt = module, opt

    def forward(self, x):
        weights = {n: p - LR * self.opt.delay * self.opt.v[id(p)] if id(p) in self.opt.v else p
                   for n, p in self.module.named_parameters()}  # fmt: skip
        return functional_call(self.module, weights, (x,))


def test_linear_weight_prediction_matches_the_hand_written_forward():
    k = 3
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(8)
    stages = sequential_stages(reference, SPLIT[k])
    opts = [HandSGD(s.parameters(), k - 1 - i, spike=False) for i, s in enumerate(stages)]
    it = iter(opts)
    naive_features_replay([Predicted(s, o) for s, o in zip(stages, opts)], data, lambda _: next(it))
    run_library(model, data, sgd, compensation="lwp", split_points=[str(i) for i in SPLIT[k]])
    assert max_param_diff(model, reference) <= 1e-5


class Recorded:
    """A module's own AdamW (as the library steps it), remembering the update each step applied: u = w_t - w_{t-1}."""

    def __init__(self, params, delay: int) -> None:
        self.params, self.delay = list(params), delay
        self.inner = torch.optim.AdamW(self.params, lr=1e-2, weight_decay=0.1)
        self.u: dict[int, torch.Tensor] = {}

    def step(self) -> None:
        before = [p.detach().clone() for p in self.params]
        self.inner.step()
        for p, w in zip(self.params, before):
            self.u[id(p)] = p.detach() - w

    def zero_grad(self) -> None:
        self.inner.zero_grad()


class Extrapolated(nn.Module):
    """A module run at w + D u: its weights extrapolated D steps along its optimizer's last update."""

    def __init__(self, module: nn.Module, opt: Recorded) -> None:
        super().__init__()
        self.module, self.opt = module, opt

    def forward(self, x):
        weights = {n: p + self.opt.delay * self.opt.u[id(p)] if id(p) in self.opt.u else p
                   for n, p in self.module.named_parameters()}  # fmt: skip
        return functional_call(self.module, weights, (x,))


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def predicted_against_naive(k: int, hand_optimizer, predicted_module, compensation: str):
    """The library with AdamW and ``compensation`` equals the naive Algorithm 1 whose module i runs as
    ``predicted_module`` on the weights its ``hand_optimizer`` (delay K-1-i) predicts; and differs from no remedy."""
    model = mlp(depth=6)
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    data = batches(8)
    stages = sequential_stages(reference, SPLIT[k])
    opts = [hand_optimizer(s.parameters(), k - 1 - i) for i, s in enumerate(stages)]
    it = iter(opts)
    naive_features_replay([predicted_module(s, o) for s, o in zip(stages, opts)], data, lambda _: next(it))
    wrapper = run_library(model, data, adamw, compensation=compensation, split_points=[str(i) for i in SPLIT[k]])
    assert max_param_diff(model, reference) <= 1e-5
    run_library(plain, data, adamw, split_points=[str(i) for i in SPLIT[k]])  # the same start, no remedy
    assert max_param_diff(model, plain) > 1e-4  # (the prediction changed the training)
    return model, wrapper


@pytest.mark.parametrize("k", [2, 3])
def test_weight_prediction_from_the_last_update_matches_the_hand_written_forward(k):
    """``compensation="predict"`` with AdamW: every delayed module plays, replays and back-propagates at w + D u;
    the last module (D = 0) runs at its own weights."""
    model, wrapper = predicted_against_naive(k, Recorded, Extrapolated, "predict")
    last = {id(p) for p in wrapper.stages[-1].parameters()}
    state = wrapper.replay_optimizer.optimizer.state
    assert all(("replay_update" in state[p]) == (id(p) not in last) for p in model.parameters())


class HandAdamW:
    """AdamW written out (lr 1e-2, betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.1), with the
    Adam-direction prediction w - lr D m_hat / (sqrt(v_hat) + eps) of its moments after its last step."""

    def __init__(self, params, delay: int) -> None:
        self.params, self.delay, self.t = list(params), delay, 0
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def step(self) -> None:
        self.t += 1
        with torch.no_grad():
            for p in self.params:
                g = p.grad
                self.m[id(p)] = 0.9 * self.m.get(id(p), torch.zeros_like(p)) + 0.1 * g
                self.v[id(p)] = 0.999 * self.v.get(id(p), torch.zeros_like(p)) + 0.001 * g * g
                p.mul_(1 - 1e-2 * 0.1)
                p -= 1e-2 * self.direction(p)

    def direction(self, p) -> torch.Tensor:
        m_hat = self.m[id(p)] / (1 - 0.9**self.t)
        v_hat = self.v[id(p)] / (1 - 0.999**self.t)
        return m_hat / (v_hat.sqrt() + 1e-8)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class AdamPredicted(nn.Module):
    def __init__(self, module: nn.Module, opt: HandAdamW) -> None:
        super().__init__()
        self.module, self.opt = module, opt

    def forward(self, x):
        weights = {n: p - 1e-2 * self.opt.delay * self.opt.direction(p).detach() if id(p) in self.opt.m else p
                   for n, p in self.module.named_parameters()}  # fmt: skip
        return functional_call(self.module, weights, (x,))


@pytest.mark.parametrize("k", [2, 3])
def test_adam_direction_prediction_matches_hand_written_adamw(k):
    """``compensation="adam"``: every delayed module plays, replays and back-propagates at
    w - lr D m_hat / (sqrt(v_hat) + eps), AdamW written out in the test; the last module at its own weights."""
    predicted_against_naive(k, HandAdamW, AdamPredicted, "adam")


@pytest.mark.parametrize("k", [2, 3])
def test_momentum_correction_matches_per_module_betas(k):
    """``compensation="momentum"``: module k steps as AdamW with beta1 ** (1 + D_k), the last module as plain AdamW."""
    model = mlp(depth=6)
    reference = copy.deepcopy(model)
    data = batches(8)
    stages = sequential_stages(reference, SPLIT[k])
    betas = iter([(0.9 ** (1 + k - 1 - i), 0.999) for i in range(k)])
    naive_features_replay(stages, data, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, betas=next(betas)))
    wrapper = run_library(model, data, adamw, compensation="momentum", split_points=[str(i) for i in SPLIT[k]])
    assert max_param_diff(model, reference) <= 1e-5
    assert wrapper.replay_optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # restored after every step


@pytest.mark.parametrize(("k", "method"), [(1, "fr"), (3, "bp")])
def test_k1_and_bp_are_unchanged_bit_for_bit(k, method):
    model = mlp(depth=6)
    plain = copy.deepcopy(model)
    data = batches(6)
    split = {"num_modules": 1} if k == 1 else {"split_points": [str(i) for i in SPLIT[k]], "method": method}
    run_library(plain, data, sgd, **split)
    run_library(model, data, sgd, compensation="spike+lwp+warmup:3", **split)
    assert max_param_diff(model, plain) == 0.0
    model = mlp(depth=6)
    plain = copy.deepcopy(model)
    run_library(plain, data, adamw, **split)
    run_library(model, data, adamw, compensation="predict+momentum", **split)
    assert max_param_diff(model, plain) == 0.0


@pytest.mark.parametrize(("make_opt", "compensation"), [(sgd, "spike+lwp+warmup:6"), (adamw, "predict+momentum")])
def test_checkpoints_resume_compensation_exactly(make_opt, compensation):
    """The warm-up clock, and the last updates ``predict`` extrapolates along, travel in the optimizer's state."""
    data = batches(8)

    def build(model):
        wrapper = ReplayModelWrapper(model, split_points=["4", "8"])
        return wrapper, ReplayOptimizer(make_opt(wrapper.parameters()), wrapper, compensation=compensation)

    def train(wrapper, opt, part):
        for x, y in part:
            F.cross_entropy(wrapper(x), y).backward()
            opt.step()
            opt.zero_grad()

    torch.manual_seed(0)
    straight = mlp(depth=6)
    first = copy.deepcopy(straight)
    train(*build(straight), data)
    wrapper, opt = build(first)
    train(wrapper, opt, data[:4])
    state = copy.deepcopy((wrapper.state_dict(), opt.state_dict()))
    resumed = mlp(depth=6)
    wrapper, opt = build(resumed)
    wrapper.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    train(wrapper, opt, data[4:])
    assert max_param_diff(straight, resumed) == 0.0


def test_bad_compensation_names_the_fix():
    wrapper = ReplayModelWrapper(mlp(depth=6), split_points=["4"])
    with pytest.raises(ValueError, match="unknown compensation 'spikes'"):
        ReplayOptimizer(sgd(wrapper.parameters()), wrapper, compensation="spikes")
    with pytest.raises(ValueError, match="defined for SGD with momentum.*compensation='warmup'"):
        ReplayOptimizer(torch.optim.AdamW(wrapper.parameters()), wrapper, compensation="spike")
    ReplayOptimizer(torch.optim.AdamW(wrapper.parameters()), wrapper, compensation="warmup:100")
    wrapper = ReplayModelWrapper(mlp(depth=6), split_points=["4"])
    with pytest.raises(ValueError, match="no momentum coefficient.*compensation='predict'"):
        ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper, compensation="momentum")
    ReplayOptimizer(torch.optim.Adagrad(wrapper.parameters()), wrapper, compensation="predict")  # any optimizer
    wrapper = ReplayModelWrapper(mlp(depth=6), split_points=["4"])
    with pytest.raises(ValueError, match="Adam-style optimizer.*compensation='predict'"):
        ReplayOptimizer(sgd(wrapper.parameters()), wrapper, compensation="adam")
    with pytest.raises(ValueError, match="one weight prediction of lwp, predict and adam"):
        ReplayOptimizer(torch.optim.AdamW(wrapper.parameters()), wrapper, compensation="adam+predict")
