"""The sufficient-direction constant sigma against gradients computed independently in the test."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer, SigmaProbe


def bn_net() -> nn.Sequential:
    """BatchNorm in the first two of three modules (no dropout: the same samples give the same function)."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4),
    )  # fmt: skip


def true_gradient(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy at the current weights (BatchNorm on batch statistics, nothing updated)."""
    ref = copy.deepcopy(model).train()
    F.cross_entropy(ref(x), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def sigma(true: torch.Tensor, g: torch.Tensor) -> float:
    return (true.double() @ g.double() / (true.double() @ true.double())).item()


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_sigmas_match_independent_true_gradients(method):
    torch.manual_seed(0)
    model = bn_net()
    wrapper = ReplayModelWrapper(model, split_points=["3", "6"], method=method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9), wrapper)
    g = torch.Generator().manual_seed(5)
    reference = (torch.randn(256, 8, generator=g), torch.randint(0, 4, (256,), generator=g))
    probe = SigmaProbe(wrapper, loss_fn=F.cross_entropy, every=1, reference=((reference[0],), reference[1]))
    data = batches(7)
    names = [[n for n, p in model.named_parameters() if any(p is q for q in s.parameters())] for s in wrapper.stages]
    for t, (x, y) in enumerate(data):
        F.cross_entropy(wrapper(x), y).backward()
        record = probe.measure((x,), y)
        applied = [torch.cat([p.grad.reshape(-1) for p in s.parameters()]) if t >= 2 - s_i else None
                   for s_i, s in enumerate(wrapper.stages)]  # fmt: skip
        ref_true = true_gradient(model, *reference)
        for i, stage_names in enumerate(names):
            delay = 2 - i
            if t < delay:
                assert record["sigma_staleness"][i] != record["sigma_staleness"][i]  # nan: not started
                continue
            same = true_gradient(model, *data[t - delay])  # the samples module i's gradient came from
            expected = sigma(torch.cat([same[n].reshape(-1) for n in stage_names]), applied[i])
            assert record["sigma_staleness"][i] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            expected = sigma(torch.cat([ref_true[n].reshape(-1) for n in stage_names]), applied[i])
            assert record["sigma_expected"][i] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert record["sigma_staleness"][2] == pytest.approx(1.0, abs=1e-6)  # the last module: no staleness
        opt.step()
        opt.zero_grad()
    assert [r["step"] for r in probe.records] == list(range(7))


def test_bp_has_no_staleness_and_the_probe_leaves_training_alone():
    torch.manual_seed(0)
    model = bn_net()
    twin = copy.deepcopy(model)
    runs = []
    for m, probed in ((model, True), (twin, False)):
        wrapper = ReplayModelWrapper(m, num_modules=3, method="bp")
        opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
        probe = SigmaProbe(wrapper, loss_fn=F.cross_entropy, every=2)
        for x, y in batches(5):
            F.cross_entropy(wrapper(x), y).backward()
            if probed:
                probe.measure((x,), y)
            opt.step()
            opt.zero_grad()
        runs.append(probe.records)
    assert [r["step"] for r in runs[0]] == [0, 2, 4]
    for r in runs[0]:
        assert r["sigma_staleness"] == pytest.approx([1, 1, 1], abs=1e-5)
        assert r["cosine_staleness"] == pytest.approx([1, 1, 1], abs=1e-5)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)  # measuring changed neither weights nor BatchNorm statistics nor the RNG
