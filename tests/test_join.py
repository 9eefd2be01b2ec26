"""``join.py``: the replays' backward folded into the user's ``loss.backward()``; the output stays the user's.

What the wrapper returns may be changed in place, as the model's own output may be (Trainer's ``loss *= n``,
``loss /= accumulation_steps`` in a hand-written loop, ``logits.div_(temperature)``), for every method, and it
is the last module's output itself, not a copy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, max_param_diff, mlp

from replay_opt import ReplayModelWrapper, ReplayOptimizer


@pytest.mark.parametrize("method", ["bp", "fr", "ddg"])
def test_in_place_changes_of_output_and_loss_train_as_out_of_place_ones(method):
    data = batches(6)

    def run(in_place: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = mlp()
        wrapper = ReplayModelWrapper(model, split_points=["4", "8"], method=method)
        opt = ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9), wrapper)
        for x, y in data:
            out = wrapper(x)
            if in_place:
                out.div_(2.0)
                loss = F.cross_entropy(out, y)
                loss *= 3.0
                loss /= 2.0
            else:
                loss = F.cross_entropy(out / 2.0, y) * 3.0 / 2.0
            loss.backward()
            opt.step()
            opt.zero_grad()
        return model

    changed, reference = run(in_place=True), run(in_place=False)
    assert max_param_diff(changed, reference) == 0
    assert max_param_diff(changed, mlp()) > 0  # (it trained)


def test_the_output_is_the_last_modules_own_tensor_not_a_copy():
    model = mlp()
    wrapper = ReplayModelWrapper(model, split_points=["4"])
    ReplayOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), wrapper)
    produced = []
    model[-1].register_forward_hook(lambda m, i, o: produced.append(o))
    out = wrapper(torch.randn(4, 8))
    assert out.untyped_storage().data_ptr() == produced[-1].untyped_storage().data_ptr()
    assert out.grad_fn is not None and out._base is None  # wired for the replays, and not a view
