"""The per-rank step (``replay_opt/multiprocess/rank.py``, ``steps.py``, ``collectives.py``) on a pipeline of
threads (``loopback.py``): each rank's module trains exactly as the single-process engine trains it, and ranks
that disagree stop with the error that names the fix.  Real processes: ``test_distributed.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, mlp
from loopback import run_ranks, threaded_pipeline

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.multiprocess.wire import PipelineError

SPLITS = {2: ["6"], 3: ["4", "8"]}


def model():
    torch.manual_seed(0)
    return mlp(depth=6)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def one_process(method: str, k: int, data, accumulation: int = 1) -> torch.nn.Module:
    """The reference: the single-process engine (``fr``/``ddg``), or plain autograd (``bp`` must be backprop)."""
    net = model()
    if method == "bp":
        wrapper, opt = net, sgd(net.parameters())
    else:
        wrapper = ReplayModelWrapper(net, split_points=SPLITS[k], method=method)
        opt = ReplayOptimizer(sgd(wrapper.parameters()), wrapper)
    for i, (x, y) in enumerate(data):
        (F.cross_entropy(wrapper(x), y) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
    return net


def train(data, accumulation: int = 1):
    def body(rank, wrapper, opt):
        losses = []
        for i, (x, y) in enumerate(data):
            loss = F.cross_entropy(wrapper(x), y) / accumulation
            loss.backward()
            losses.append(loss.item())
            if (i + 1) % accumulation == 0:
                opt.step()
                opt.zero_grad()
        return losses

    return body


def trained_weights(pairs, results):
    """Each parameter as the rank that trains it holds it, by name."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    weights = {}
    for wrapper, _ in pairs:
        own = {id(p) for p in wrapper.local_parameters()}
        weights.update({n: p.detach() for n, p in wrapper.module.named_parameters() if id(p) in own})
    return weights


@pytest.mark.parametrize(("method", "k", "accumulation"), [("fr", 2, 1), ("fr", 3, 1), ("ddg", 2, 1), ("bp", 2, 1),
                                                           ("bp", 3, 1), ("fr", 2, 2)])  # fmt: skip
def test_each_rank_trains_its_module_as_one_process_does(method, k, accumulation):
    data = batches(8, last=5)
    pairs = threaded_pipeline(model, k, method=method, split_points=SPLITS[k], optimizer=sgd)
    results = run_ranks(pairs, train(data, accumulation))
    weights = trained_weights(pairs, results)
    reference = dict(one_process(method, k, data, accumulation).named_parameters())
    assert set(weights) == set(reference)  # every parameter is trained by exactly one rank
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name].detach(), rtol=0, atol=1e-6, msg=name)
    # Rank 0 runs the last module: real losses; rank 1 computes its loss from zero logits (placeholders).
    assert len(set(results[0])) == len(data) and results[1] == [pytest.approx(math.log(4) / accumulation)] * len(data)


def test_evaluation_returns_the_real_output_on_the_last_modules_rank():
    data = batches(3)
    pairs = threaded_pipeline(model, 2, split_points=SPLITS[2], optimizer=sgd)

    def body(rank, wrapper, opt):
        train(data)(rank, wrapper, opt)
        wrapper.eval()
        with torch.no_grad():
            return wrapper(data[0][0])

    outs = run_ranks(pairs, body)
    trained = {n: p.detach().clone() for n, p in pairs[0][0].module.named_parameters()}
    trained.update(trained_weights(pairs, outs))
    net = model()
    net.load_state_dict(trained)
    torch.testing.assert_close(outs[0], net(data[0][0]), rtol=0, atol=1e-6)  # the last module's rank
    assert outs[1].shape == outs[0].shape and not outs[1].any()  # module 1's rank: zeros of the same shape


def test_a_rank_on_other_batches_stops_naming_the_fix():
    data = batches(2)
    other = batches(2, batch=12)  # (float inputs are not fingerprinted: each rank may augment its own)
    pairs = threaded_pipeline(model, 2, split_points=SPLITS[2], optimizer=sgd, timeout=1.0)
    results = run_ranks(pairs, lambda rank, w, o: train(data if rank == 0 else other)(rank, w, o))
    errors = [str(r) for r in results if isinstance(r, PipelineError)]
    assert any("got a batch of" in e and "accelerator.prepare(loader) *after*" in e for e in errors), errors


def test_a_rank_that_skips_optimizer_step_stops_naming_the_fix():
    data = batches(3)
    pairs = threaded_pipeline(model, 2, split_points=SPLITS[2], optimizer=sgd, timeout=1.0)

    def body(rank, wrapper, opt):
        for x, y in data:
            F.cross_entropy(wrapper(x), y).backward()
            if rank == 0:  # rank 1 forgets optimizer.step()
                opt.step()
            opt.zero_grad()

    results = run_ranks(pairs, body)
    errors = [str(r) for r in results if isinstance(r, PipelineError)]
    assert any("optimizer steps but rank" in e and "every process must call optimizer.step()" in e for e in errors)


def test_the_global_gradient_norm_is_the_whole_models():
    data = batches(1)
    pairs = threaded_pipeline(model, 2, method="bp", split_points=SPLITS[2], optimizer=sgd)

    def body(rank, wrapper, opt):
        x, y = data[0]
        F.cross_entropy(wrapper(x), y).backward()
        return float(wrapper.rank.collectives.clip_grad_norm_(wrapper.parameters(), max_norm=1e9))

    norms = run_ranks(pairs, body)
    net = model()
    x, y = data[0]
    F.cross_entropy(net(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9).item()
    assert norms[0] == norms[1] == pytest.approx(expected, rel=1e-6)
