"""The messages between ranks (``replay_opt/multiprocess/wire.py``) and who runs what (``layout.py``)."""

from __future__ import annotations

import pytest
import torch

from replay_opt.multiprocess.layout import Layout
from replay_opt.multiprocess.wire import HEADER_WORDS, Header, Kind, Op, PipelineError, decode, encode, fingerprint


def test_a_header_and_its_values_survive_the_round_trip():
    header = Header(Kind.ACTIVATIONS, 0, tick=7, evals=3, steps=5, batch=16, fingerprint=1234.5)
    values = (torch.randn(2, 3), None, True, 17, -0.25, torch.arange(4).view(2, 2), torch.ones(0, dtype=torch.bool))
    words, tensors = encode(header, values)
    assert words.dtype == torch.int64 and words.numel() == HEADER_WORDS
    assert [t.data_ptr() for t in tensors] == [values[0].data_ptr(), values[5].data_ptr(), values[6].data_ptr()]
    got, received = decode(words, torch.device("cpu"), peer=1)
    assert got == header
    assert received[1:5] == (None, True, 17, -0.25) and type(received[2]) is bool
    for sent, empty in zip((values[0], values[5], values[6]), (received[0], received[5], received[6])):
        assert empty.shape == sent.shape and empty.dtype == sent.dtype  # receive buffers, filled by the transport


def test_sync_headers_say_what_the_sender_is_doing():
    assert "wait_for_everyone" in Header(Kind.SYNC, int(Op.BARRIER)).doing()
    doing = Header(Kind.EVAL, tick=4, evals=2, steps=3).doing()
    assert doing.startswith("evaluating") and "training step 4, evaluation forward 2, optimizer step 3" in doing


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [((torch.zeros(2, dtype=torch.complex128),), TypeError, "dtype torch.complex128"),
     (("text",), TypeError, "cannot send a str between modules"),
     ((0,) * HEADER_WORDS, ValueError, "too many values")],
)  # fmt: skip
def test_what_cannot_be_sent_is_named(values, error, message):
    with pytest.raises(error, match=message):
        encode(Header(Kind.ACTIVATIONS), values)


def test_a_foreign_message_is_recognised():
    with pytest.raises(PipelineError, match="not a replay_opt header"):
        decode(torch.zeros(HEADER_WORDS, dtype=torch.int64), torch.device("cpu"), peer=3)


def test_the_fingerprint_tells_integer_batches_apart_and_ignores_floats():
    ids = torch.arange(12).view(3, 4)
    assert fingerprint([ids]) == fingerprint([ids.clone()])
    assert fingerprint([ids]) != fingerprint([ids.flip(0)])  # the same rows in another order
    assert fingerprint([ids, torch.randn(3)]) == fingerprint([ids, torch.randn(3)])  # augmented floats differ
    assert fingerprint([torch.randn(3, 4)]) == 0.0


def test_each_replicas_first_rank_runs_the_last_module():
    layout = Layout(world_size=6, rank=4, num_modules=3)  # 2 replicas of 3 modules
    assert layout.replicas == 2 and layout.replica == 1 and layout.stage == 0  # rank 4: module 1 of replica 1
    stages = [Layout(6, r, 3).stage for r in range(6)]
    assert stages == [2, 0, 1, 2, 0, 1]
    assert all(Layout(6, r, 3).rank_of(Layout(6, r, 3).stage) == r for r in range(6))
    assert layout.rank_of(2, replica=0) == 0 and layout.peers == [1, 2]
    assert "replica 1: module 1: rank 4, module 2: rank 5, module 3: rank 3" in layout.describe()
