"""Any model in two lines: transformers, torchvision, reused layers, tied weights, in-place ops at a cut.

Every zoo model (tests/zoo.py, tiny random-init configs) at K = 1, 2, 4:
* ``method="bp"`` equals plain autograd after two steps (a second batch of another size and
  sequence length), through the HF ``labels=`` path and the loss computed outside from logits;
* ``fr`` and ``ddg`` train: finite, and every parameter that gets a gradient in plain
  training gets one once every module has started;
* eval through the stages equals the original model; the output type is the model's own.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, call, loss_of

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.cut.capture import CaptureError

HF = [name for name, e in ZOO.items() if e.hf]
VISION = [name for name, e in ZOO.items() if not e.hf]


def _slow_for_hf(names):
    return [pytest.param(n, marks=pytest.mark.slow) if ZOO[n].hf and n != "gpt2" else n for n in names]


@pytest.fixture(scope="module")
def models():
    """One model object per zoo entry, reused (weights restored) so its capture is reused across K."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            model = ZOO[name].build().train()
            built[name] = (model, copy.deepcopy(model.state_dict()))
        model, state = built[name]
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.train()
        return model

    return get


def _train(model, batches, entry, in_model, step=None):
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # the same dropout draws in both runs
        loss = loss_of(entry, call(model, batch, in_model, entry), batch, in_model)
        loss.backward()
        if step is not None:
            step(i)


@pytest.mark.parametrize("name", _slow_for_hf(list(ZOO)))
def test_bp_equals_plain_autograd_and_eval_equals_the_model(models, name):
    entry = ZOO[name]
    batches = [entry.batch(4, 0), entry.batch(3, 1)]
    model = models(name)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    paths = (True, False) if entry.hf else (False,)
    for in_model in paths:
        reference.load_state_dict(models(name).state_dict())
        _train(reference, batches, entry, in_model, step=lambda _: (opt.step(), opt.zero_grad()))
        expected = copy.deepcopy(reference.state_dict())
        for k in (1, 2, 4):
            model = models(name)
            wrapper = ReplayModelWrapper(model, num_modules=k, method="bp")
            ropt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
            _train(wrapper, batches, entry, in_model, step=lambda _: (ropt.step(), ropt.zero_grad()))
            for key, value in model.state_dict().items():
                torch.testing.assert_close(
                    value, expected[key], rtol=0, atol=1e-5, msg=lambda m, k=k, key=key: f"K={k} {key}: {m}"
                )
    # Eval through the stages (one device per module forces the staged path) equals the model.
    model = models(name)
    wrapper = ReplayModelWrapper(model, num_modules=4, devices=["cpu"] * 4).eval()
    batch = entry.batch(3, 2)
    with torch.no_grad():
        got, want = call(wrapper, batch), call(model.eval(), batch)
    assert type(got) is type(want)
    for a, b in zip(_leaves(got), _leaves(want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _leaves(out):
    return [out] if isinstance(out, torch.Tensor) else [v for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("method", ["fr", "ddg"])
@pytest.mark.parametrize("name", _slow_for_hf(list(ZOO)))
def test_stale_methods_train_every_parameter(models, name, method):
    entry = ZOO[name]
    model = models(name)
    plain = copy.deepcopy(model)
    call(plain, entry.batch(2, 0), with_labels=entry.hf)
    loss_of(entry, call(plain, entry.batch(2, 0), with_labels=entry.hf), entry.batch(2, 0), entry.hf).backward()
    expected = {n for n, p in plain.named_parameters() if p.grad is not None}
    for k in (2, 4):
        model = models(name)
        wrapper = ReplayModelWrapper(model, num_modules=k, method=method)
        opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
        got: set[str] = set()
        for step in range(k + 1):  # module 1 starts at step K-1
            batch = entry.batch(4, step)
            out = call(wrapper, batch, with_labels=entry.hf)
            assert type(out) is type(call(plain, batch, with_labels=entry.hf))
            loss_of(entry, out, batch, entry.hf).backward()
            got |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            opt.step()
            opt.zero_grad()
        assert expected <= got, f"K={k}: never trained {sorted(expected - got)[:5]}"
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_dni_runs_and_dgl_refuses_model_outputs_clearly(models):
    entry = ZOO["bert"]
    model = models("bert")
    wrapper = ReplayModelWrapper(model, num_modules=2, method="dni")
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    for step in range(2):
        wrapper(**entry.batch(4, step)).loss.backward()
        opt.step()
        opt.zero_grad()
    wrapper = ReplayModelWrapper(models("bert"), num_modules=2, method="dgl")
    ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        wrapper(**entry.batch(4, 0))


def test_a_new_batch_or_sequence_length_does_not_recapture(models):
    entry = ZOO["gpt2"]
    wrapper = ReplayModelWrapper(models("gpt2"), num_modules=2)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    for n, seed in [(4, 0), (3, 1), (4, 2), (2, 3)]:  # sequence lengths 8, 9, 10, 8
        wrapper(**entry.batch(n, seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    programs = wrapper.partition.programs()
    assert len(programs) == 1 and programs[0].graph.tracer == "export"
    # Without labels: another signature, one more capture, and the output has no loss.
    out = wrapper(input_ids=entry.batch(2, 0)["input_ids"])
    assert out.loss is None and len(wrapper.partition.programs()) == 2


def test_units_reach_transformer_blocks():
    tv = pytest.importorskip("torchvision")
    assert [u for u in ReplayModelWrapper(ZOO["gpt2"].build(), num_modules=2).units if ".h." in u] == [
        "transformer.h.0", "transformer.h.1", "transformer.h.2", "transformer.h.3"]  # fmt: skip
    units = ReplayModelWrapper(ZOO["bert"].build(), num_modules=2).units
    assert "bert.encoder.layer.3" in units
    vit = ReplayModelWrapper(tv.models.VisionTransformer(32, 8, 4, 2, 32, 64), num_modules=4)
    assert "encoder.layers.encoder_layer_2" in vit.units and len(vit.split_points) == 3


# --------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    """Embedding -> MLP -> a head that reuses the embedding matrix (modules 1 and 2 share it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mlp = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def test_tied_weights_get_the_sum_of_both_modules_gradients():
    """Features Replay K=2 against a hand-written reference: W gets module 1's stale-step gradient
    plus module 2's current one, and is updated once."""
    torch.manual_seed(0)
    model = TiedLM()
    ref = copy.deepcopy(model)
    wrapper = ReplayModelWrapper(model, split_points=["mlp"])
    assert any(p is model.embed.weight for p in wrapper.stages[0].parameters())
    assert any(p is model.embed.weight for p in wrapper.stages[1].parameters())
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.5), wrapper)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 12, (5,), generator=g), torch.randint(0, 12, (5,), generator=g)) for _ in range(4)]
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()

    # The reference: module 1 = embedding, module 2 = mlp + head (the same W), plain autograd.
    W = ref.embed.weight
    params = [W, *ref.mlp.parameters()]
    previous = None  # (input of module 1 at step t-1, gradient sent down for its output)
    for x, y in data:
        with torch.no_grad():
            h = F.embedding(x, W)
        h = h.requires_grad_()
        loss = F.cross_entropy(F.linear(ref.mlp(h), W), y)
        grads = torch.autograd.grad(loss, [*params, h])
        total = [g.clone() for g in grads[:-1]]
        if previous is not None:  # module 1 replays the old input with the current W
            old_x, delta = previous
            total[0] += torch.autograd.grad(F.embedding(old_x, W), W, delta)[0]
        previous = (x, grads[-1])
        with torch.no_grad():
            for p, gp in zip(params, total):
                p -= 0.5 * gp
    torch.testing.assert_close(model.embed.weight, W, rtol=0, atol=1e-6)
    assert model.head.weight is model.embed.weight


def test_tied_weights_with_bp_equal_plain_autograd():
    torch.manual_seed(0)
    model = TiedLM()
    ref = copy.deepcopy(model)
    wrapper = ReplayModelWrapper(model, split_points=["mlp"], method="bp")
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.5), wrapper)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x, y = torch.randint(0, 12, (5,)), torch.randint(0, 12, (5,))
    for m, o in ((wrapper, opt), (ref, ropt)):
        F.cross_entropy(m(x), y).backward()
        o.step()
    torch.testing.assert_close(model.embed.weight, ref.embed.weight, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- Sequential edge cases, in-place


def test_a_sequential_that_reuses_a_layer_is_the_whole_network():
    act, shared = nn.Tanh(), nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(8, 16), act, shared, act, shared, act, nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    for k in (2, 3):
        wrapper = ReplayModelWrapper(copy.deepcopy(ref), num_modules=k, method="bp")
        x = torch.randn(4, 8)
        assert wrapper(x).shape == (4, 4)
        torch.testing.assert_close(wrapper(x), ref(x), rtol=0, atol=0)
    wrapper = ReplayModelWrapper(model, split_points=["3"])  # between the two uses of `shared`
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for _ in range(3):
        F.cross_entropy(wrapper(torch.randn(4, 8)), torch.randint(0, 4, (4,))).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model[6].weight, ref[6].weight)  # the last layer trains


@pytest.mark.parametrize("method", ["fr", "ddg", "dni"])
def test_in_place_operations_at_a_cut(method):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Hardswish(inplace=True),
                          nn.Linear(16, 4))  # fmt: skip
    wrapper = ReplayModelWrapper(model, split_points=["1", "3"], method=method)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for _ in range(4):
        F.cross_entropy(wrapper(torch.randn(4, 8)), torch.randint(0, 4, (4,))).backward()
        opt.step()
        opt.zero_grad()
    assert [s.programs[0].mutates_inputs for s in wrapper.stages] == [False, True, True]


def test_in_place_at_a_cut_keeps_replays_exact():
    """ReLU(inplace=True) right after the cut must not alter the stored input that is replayed."""
    from conftest import batches, max_param_diff, mlp
    from naive import naive_features_replay, sequential_stages
    from test_fr import OPTIMIZERS

    torch.manual_seed(0)
    model = mlp(depth=4)
    reference = copy.deepcopy(model)  # the same function, computed out of place
    model[1] = nn.ReLU(inplace=True)
    reference[1] = nn.ReLU()
    wrapper = ReplayModelWrapper(model, split_points=["1"])
    opt = ReplayOptimizer(OPTIMIZERS["sgd"](wrapper.parameters()), wrapper)
    data = batches(5)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    naive_features_replay(sequential_stages(reference, [1]), data, OPTIMIZERS["sgd"])
    assert max_param_diff(model, reference) <= 1e-6


@pytest.mark.slow
def test_balance_time_on_a_torchvision_resnet_with_in_place_relus(models):
    model = models("tv-resnet18")
    wrapper = ReplayModelWrapper(model, num_modules=4, balance="time", example_inputs=(torch.randn(8, 3, 32, 32),))
    assert len(wrapper.split_points) == 3
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.01), wrapper)
    x, y = ZOO["tv-resnet18"].batch(4, 0)
    F.cross_entropy(wrapper(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------- untraceable models


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # Python control flow on a tensor value: neither tracer can capture it
            h = -h
        return self.b(h)


def test_an_untraceable_model_gets_an_error_whose_fix_works():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.body = DataDependent()
            self.head = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    wrapper = ReplayModelWrapper(Net(), split_points=["body.b"], method="bp")  # a cut inside the untraceable code
    with pytest.raises(CaptureError, match=r"(?s)fx: .*export: .*split_points=\[\.\.\.\] at the boundaries"):
        wrapper(torch.randn(4, 8))
    # The fix the error names: cut at the boundary of the submodule holding that code.
    model = Net()
    wrapper = ReplayModelWrapper(model, split_points=["body", "head"], method="bp")
    torch.testing.assert_close(wrapper(torch.randn(4, 8)).shape, torch.Size([4, 4]))
    assert wrapper.partition.programs()[0].graph.tracer == "fx"


# --------------------------------------------------------------------------- torchvision and timm, bit for bit

# One entry per implementation (resnext50_32x4d is torchvision's ResNet class with grouped convolutions,
# deit_tiny timm's VisionTransformer: both left out as duplicates of resnet50 and vit_tiny).
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0",
               "regnet_y_400mf", "mnasnet0_5", "efficientnet_b0", "densenet121", "googlenet", "convnext_tiny",
               "swin_t"]  # fmt: skip
TIMM = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM])
def test_vision_models_with_bp_match_plain_autograd_bit_for_bit(name):
    source, arch = name.split(":")
    torch.manual_seed(0)
    if source == "torchvision":
        tv = pytest.importorskip("torchvision")
        extra = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
        base = tv.models.get_model(arch, num_classes=10, **extra)
    else:
        timm = pytest.importorskip("timm")
        base = timm.create_model(arch, num_classes=10, **({"img_size": 32} if "224" in arch else {}))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    reference = copy.deepcopy(base)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.manual_seed(1)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    for k in (1, 2, 4):
        model = copy.deepcopy(base)
        wrapper = ReplayModelWrapper(model, num_modules=k, method="bp")
        ropt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
        torch.manual_seed(1)
        F.cross_entropy(wrapper(x), y).backward()
        ropt.step()
        for (key, a), b in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(a, b), f"K={k} {key}"
