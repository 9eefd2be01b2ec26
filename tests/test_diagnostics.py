"""The sufficient-direction constant sigma against a gradient computed independently in the test."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, bn_dropout_net

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def test_bp_gradient_is_the_true_gradient():
    wrapper = ReplayModelWrapper(bn_dropout_net(), num_modules=3, method="bp", diagnostics_every=2)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for x, y in batches(5):
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert [r["step"] for r in wrapper.diagnostics] == [0, 2, 4]
    for r in wrapper.diagnostics:
        assert r["sigma"] == pytest.approx([1, 1, 1], abs=1e-5)
        assert r["cosine"] == pytest.approx([1, 1, 1], abs=1e-5)


@pytest.mark.parametrize("method", ["fr", "ddg", "dni", "dgl"])
def test_sigma_matches_an_independent_true_gradient(method):
    """The true gradient: a plain copy of the model at w^t, the same batch, the same dropout draws."""
    model = bn_dropout_net()
    wrapper = ReplayModelWrapper(model, num_modules=3, method=method, diagnostics_every=1)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9), wrapper)
    expected = []
    for x, y in batches(6, last=5):
        rng = torch.get_rng_state()
        reference = copy.deepcopy(model)  # w^t, before this step's update
        F.cross_entropy(wrapper(x), y, label_smoothing=0.1).backward()
        applied = [[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in s.parameters()]
                   for s in wrapper.stages]  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng)
            F.cross_entropy(reference(x), y, label_smoothing=0.1).backward()
        ref_params = dict(reference.named_parameters())
        sigmas = []
        for stage, grads in zip(wrapper.stages, applied):
            names = [n for n, p in model.named_parameters() if any(p is q for q in stage.parameters())]
            true = torch.cat([ref_params[n].grad.reshape(-1) for n in names]).double()
            g = torch.cat([g.reshape(-1) for g in grads]).double()
            sigmas.append((true @ g / (true @ true)).item())
        expected.append(sigmas)
        opt.step()
        opt.zero_grad()
    got = [r["sigma"] for r in wrapper.diagnostics]
    assert len(got) == 6
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    if method == "fr":
        assert got[0][:2] == [0.0, 0.0]  # modules 1 and 2 have no gradient yet at step 0
        assert got[-1][2] == pytest.approx(1.0, abs=1e-5)  # the last module gets the true gradient
