"""No silent bypass (``replay_opt/bypass.py``): every route around the wrapper fails at the first step, naming
what happened and the fix; evaluation and the wrapper's own work are left alone."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.bypass import BypassError

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def wrapped():
    model = ReplayModelWrapper(gpt2(), num_modules=2, method="fr")
    optimizer = ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.train()
    return model, optimizer


ROUTES = {
    # attribute forwarding to the inner model's submodules
    "base_model": lambda m: m.base_model(IDS).last_hidden_state.sum(),
    "transformer": lambda m: m.transformer(IDS).last_hidden_state.sum(),
    "lm_head": lambda m: m.lm_head(torch.randn(2, 16)).sum(),
    "get_output_embeddings()": lambda m: m.get_output_embeddings()(torch.randn(2, 16)).sum(),
    "get_input_embeddings()": lambda m: m.get_input_embeddings()(IDS).sum(),
    # the model itself, around the wrapper
    "module": lambda m: m.module(input_ids=IDS, labels=IDS).loss,
}


@pytest.mark.parametrize("route", ROUTES)
def test_submodules_reached_through_the_wrapper_refuse_to_train(wrapped, route):
    model, _ = wrapped
    with pytest.raises(BypassError, match="outside the wrapper") as error:
        ROUTES[route](model)
    message = str(error.value)
    assert "method='fr'" in message and "out = model(**batch)" in message and "torch.no_grad()" in message


def test_evaluation_and_copies_may_call_submodules(wrapped):
    model, _ = wrapped
    with torch.no_grad():
        ROUTES["base_model"](model)
    model.eval()
    try:
        ROUTES["module"](model)
    finally:
        model.train()
    twin = copy.deepcopy(model.module)  # a copy is not wrapped: it trains on its own
    twin.train()
    twin(input_ids=IDS, labels=IDS).loss.backward()


def test_a_replaced_forward_that_computes_around_the_pipeline_fails_at_step():
    """``model.forward = ...`` computing with the parameters directly (no module call): ``step()`` sees gradients
    the wrapper's forward did not produce."""
    model = ReplayModelWrapper(gpt2(), num_modules=2, method="fr")
    optimizer = ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.train()

    def forward(self, input_ids, labels=None):
        weight = self.module.transformer.wte.weight
        logits = F.embedding(input_ids, weight) @ weight.t()
        return types.SimpleNamespace(loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()))

    model.forward = types.MethodType(forward, model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    with pytest.raises(BypassError, match="ran no training forward since the last step"):
        optimizer.step()


def test_a_forward_hook_that_calls_a_submodule_fails():
    model = ReplayModelWrapper(gpt2(), num_modules=2, method="fr")
    ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.train()
    model.register_forward_hook(lambda mod, args, out: mod.lm_head(torch.randn(2, 16)))
    with pytest.raises(BypassError, match=r"lm_head \(Linear\)"):
        model(input_ids=IDS, labels=IDS)


def test_trl_fused_head_patched_onto_the_wrapper_runs_through_the_cut():
    """TRL's ``add_fused_lm_head(model)`` replaces ``model.forward``; the wrapper adopts the head instead, so the
    model runs through the pipeline and the head's outputs are TRL's own (checked against plain autograd with
    TRL's kernel)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    plain = gpt2()
    trl_utils.add_fused_lm_head(plain, outputs=("log_probs", "entropy", "is_top1"))
    model = ReplayModelWrapper(gpt2(), num_modules=2, method="bp")
    ReplayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert "forward" not in model.__dict__  # adopted, not installed
    model.train()
    plain.train()
    labels = IDS.clone()
    labels[:, :2] = -100
    ours, theirs = (
        torch.manual_seed(1) and m(input_ids=IDS, labels=labels, fused_lm_head=True) for m in (model, plain)
    )  # (the same dropout masks: bp in one process draws as the model does)
    assert type(ours) is type(theirs)
    for field in ("loss", "log_probs", "entropy", "label_mask", "is_top1"):
        assert torch.allclose(getattr(ours, field).float(), getattr(theirs, field).float(), atol=1e-6), field
    ours.loss.backward()
    theirs.loss.backward()
    for p, q in zip(model.module.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_peft_adapters_added_around_the_wrapper_are_refused():
    """``get_peft_model(wrapper, ...)`` -- what ``SFTTrainer(model=wrapper, peft_config=...)`` does -- would put
    adapters the wrapper's captured modules and the user's optimizer never see: refused, naming the order that works."""
    peft = pytest.importorskip("peft")
    model = ReplayModelWrapper(gpt2(), num_modules=2, method="fr")
    with pytest.raises(ValueError, match=r"Apply PEFT first and wrap the PEFT model.*drop peft_config="):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
