"""method='gpipe' / '1f1b' (replay_opt/multiprocess/schedules.py): what is checked in one process.

Their training runs -- against plain autograd, BatchNorm and dropout included -- are in
tests/test_distributed.py (they need one process per module)."""

from __future__ import annotations

import pytest
from conftest import mlp

from replay_opt import ReplayModelWrapper
from replay_opt.multiprocess.schedules import microbatches_for


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_one_process_is_refused_with_the_launch_command(method):
    with pytest.raises(ValueError, match=r"launch one process per module \(e.g. `accelerate launch --num_processes 2"):
        ReplayModelWrapper(mlp(), num_modules=2, method=method)


def test_microbatches_belong_to_the_microbatched_methods():
    with pytest.raises(ValueError, match="microbatches= is for method='gpipe' or '1f1b'"):
        ReplayModelWrapper(mlp(), num_modules=2, method="fr", microbatches=4)
    with pytest.raises(ValueError, match="positive integer"):
        ReplayModelWrapper(mlp(), num_modules=2, method="gpipe", microbatches=0)
    with pytest.raises(ValueError, match=r"needs microbatches >= num_modules \(3\), got 2; pass microbatches=3"):
        ReplayModelWrapper(mlp(), num_modules=3, method="1f1b", microbatches=2)


def test_a_batch_the_microbatches_do_not_divide_is_cut_into_equal_ones():
    assert microbatches_for(64, 8) == 8
    assert microbatches_for(60, 8) == 6  # the most <= 8 that divide 60
    assert microbatches_for(7, 4) == 1  # a prime last batch: one micro-batch, still exact
    assert microbatches_for(7, 4, at_least=2) == 7  # 1F1B with 2 modules: the fewest >= 2 that divide 7
    assert microbatches_for(12, 4, at_least=3) == 4
    with pytest.raises(ValueError, match="a batch of 1 cannot be cut into 2 or more"):
        microbatches_for(1, 4, at_least=2)
