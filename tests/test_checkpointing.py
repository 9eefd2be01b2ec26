"""Activation (gradient) checkpointing inside the wrapper (``cut/partition.py``, ``Checkpointing``): each module is
recomputed in backward with the same random draws and BatchNorm counting each batch once, so losses, gradients,
weights and running statistics are those of plain autograd (bp) and of the same method without checkpointing;
what it holds for backward drops to the modules' inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, bn_dropout_net

from replay_opt import ReplayModelWrapper, ReplayOptimizer


def train(model, steps, method=None, checkpointing=False, k=3, **wrap):
    """Losses and the model after ``steps`` SGD steps, plain (method None) or wrapped."""
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if method is not None:
        model = ReplayModelWrapper(model, num_modules=k, method=method, **wrap)
        optimizer = ReplayOptimizer(optimizer, model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            assert model.is_gradient_checkpointing
    model.train()
    losses = []
    for x, y in batches(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def same_state(a, b, atol=1e-6):
    a, b = a.state_dict(), b.state_dict()
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def test_bp_with_checkpointing_is_plain_autograd():
    """BatchNorm and dropout on: the recomputation draws the same masks and leaves the running statistics alone."""
    net = bn_dropout_net()
    plain_losses, plain = train(copy.deepcopy(net), 4)
    losses, wrapped = train(copy.deepcopy(net), 4, "bp", checkpointing=True)
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    assert same_state(wrapped.module, plain)


@pytest.mark.parametrize("method", ["fr", "dni", "dgl"])
def test_a_method_with_checkpointing_is_the_method_without(method):
    """FR's replays (run with BatchNorm frozen, on a stored RNG state) recomputed; the baselines likewise."""
    net = bn_dropout_net()
    ref_losses, ref = train(copy.deepcopy(net), 6, method)
    losses, wrapped = train(copy.deepcopy(net), 6, method, checkpointing=True)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert same_state(wrapped.module, ref.module)


@pytest.mark.slow
def test_a_captured_transformer_with_dropout(tmp_path):
    """A graph captured by torch.export (GPT-2, dropout on), bp against plain autograd and fr against fr."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    net = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (2, 4, 8), generator=torch.Generator().manual_seed(0))

    def run(model, method=None, checkpointing=False):
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if method is not None:
            model = ReplayModelWrapper(model, num_modules=2, method=method)
            optimizer = ReplayOptimizer(optimizer, model)
            if checkpointing:
                model.gradient_checkpointing_enable()
        model.train()
        losses = []
        for batch in ids:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, model

    plain = run(copy.deepcopy(net))
    bp = run(copy.deepcopy(net), "bp", checkpointing=True)
    assert bp[0] == pytest.approx(plain[0], abs=1e-6) and same_state(bp[1].module, plain[1])
    fr = run(copy.deepcopy(net), "fr")
    fr_checkpointed = run(copy.deepcopy(net), "fr", checkpointing=True)
    assert fr_checkpointed[0] == pytest.approx(fr[0], abs=1e-6)
    assert same_state(fr_checkpointed[1].module, fr[1].module)


def test_it_holds_only_the_modules_inputs():
    net = bn_dropout_net()
    held = {}
    for checkpointing in (False, True):
        _, wrapped = train(copy.deepcopy(net), 4, "fr", checkpointing=checkpointing, track_memory=True)
        held[checkpointing] = wrapped.memory_report()["activations"]
    assert 0 < held[True] < held[False] / 2


def test_checkpointing_options():
    model = ReplayModelWrapper(bn_dropout_net(), num_modules=3, method="bp")
    model.activation_checkpointing_enable(every_n_layers=2)
    assert [model.partition.checkpointing.covers(i) for i in range(3)] == [True, False, True]
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="offload=True.*drop it"):
        model.activation_checkpointing_enable(offload=True)
    with pytest.raises(ValueError, match="which is not DDG.*gradient_checkpointing=False"):
        ReplayModelWrapper(bn_dropout_net(), num_modules=3, method="ddg").gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="unknown checkpointing options"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"no_such_option": 1})


@pytest.mark.slow
def test_one_process_per_module_with_checkpointing(cpu_cluster):
    """Two processes (BatchNorm and dropout on): GPipe's training pass, each module recomputed in backward, gives
    the weights and statistics of the same run without checkpointing.  (FR with checkpointing in two processes:
    SFTTrainer's default, tests/test_finetune.py.)"""
    plain, checkpointed = (cpu_cluster.run("dist_worker:train_microbatched_bn", method="gpipe", microbatches=2,
                                           steps=3, checkpointing=c) for c in (False, True))  # fmt: skip
    assert checkpointed[1]["calls"] > plain[1]["calls"]  # rank 1 runs module 1: recomputed in backward
    for a, b in zip(plain, checkpointed):
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
