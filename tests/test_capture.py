"""``capture.py``: what cannot cross a cut is named in the error, with a fix that works."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.cut.capture import CaptureError

cache_utils = pytest.importorskip("transformers.cache_utils")


class CachingModel(nn.Module):
    """As a transformers model whose ``forward`` takes ``use_cache`` only through ``**kwargs``: it returns a
    cache unless told not to, by the call or by its config."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(use_cache=True)
        self.embed, self.block, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, **kwargs) -> dict:
        h = self.block(self.embed(x))
        use_cache = kwargs.get("use_cache", self.config.use_cache)
        return {"logits": self.head(h), "past_key_values": cache_utils.DynamicCache() if use_cache else None}


def test_a_returned_cache_is_named_with_a_fix_that_works():
    model = CachingModel()
    wrapper = ReplayModelWrapper(model, num_modules=2)
    ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    with pytest.raises(CaptureError, match=r"returns a DynamicCache.*model.config.use_cache = False"):
        wrapper(torch.randn(2, 4))
    model.config.use_cache = False  # the fix the error names
    wrapper = ReplayModelWrapper(model, num_modules=2)
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    for _ in range(3):
        wrapper(torch.randn(2, 4))["logits"].sum().backward()
        opt.step()
        opt.zero_grad()


def test_use_cache_is_turned_off_through_the_cut_only():
    """A model whose ``forward`` takes ``use_cache``: training and staged evaluation run without a cache, plain
    one-device evaluation is the model's own call, cache included."""

    class Explicit(CachingModel):
        def forward(self, x: torch.Tensor, use_cache: bool | None = None) -> dict:
            return super().forward(x, use_cache=self.config.use_cache if use_cache is None else use_cache)

    wrapper = ReplayModelWrapper(Explicit(), num_modules=2)
    ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    assert wrapper(torch.randn(2, 4))["past_key_values"] is None
    with torch.no_grad():
        assert isinstance(wrapper(torch.randn(2, 4))["past_key_values"], cache_utils.DynamicCache)


def test_a_program_belongs_to_one_autocast_state_and_the_example_inputs_capture_is_reused():
    """torch.export bakes autocast's casts into the graph: a bf16 step gets its own program, and an fp32 step
    after it the fp32 one. The capture made from ``example_inputs`` (with the defaults of a transformers config,
    ``use_cache=True``) is the one the training forwards use."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (2, 8))
    wrapper = ReplayModelWrapper(model, num_modules=2, example_inputs={"input_ids": ids, "labels": ids})
    opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    (captured,) = wrapper.partition.programs()
    programs = []
    for bf16 in (False, True, False):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = wrapper(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        programs.append(wrapper.partition.current)
        assert torch.isfinite(loss)
    assert programs[0] is programs[2] is captured  # the example inputs' capture
    assert programs[1] is not programs[0] and len(wrapper.partition.programs()) == 2
