"""The planner: its formulas against arithmetic written out here, its cut against brute force, its profile."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch
from conftest import mlp

from replay_opt.cut.units import candidate_units
from replay_opt.plan import Link, UnitProfile, best_fr_cut, profile, recommend, simulate, simulate_two_per_rank


def units(spec):
    return [UnitProfile(f"u{i}", f, b, nbytes, 0) for i, (f, b, nbytes) in enumerate(spec)]


def test_simulate_formulas():
    us = units([(1.0, 2.0, 100), (2.0, 4.0, 200), (1.0, 1.0, 300)])
    link = Link(bandwidth=100.0, latency=0.5)  # a message of n bytes takes 0.5 + n / 100 s
    t = simulate(us, [1], link, microbatches=2)  # modules: [u0], [u1, u2]
    c = 0.5 + 100 / 100  # the boundary after u0
    assert t["one_device"] == pytest.approx(11.0)
    assert t["bp"] == pytest.approx(11.0 + 2 * c)
    assert t["ddg"] == pytest.approx(max(1 + 2 + c, 3 + 5))
    assert t["fr"] == pytest.approx(max(2 * 1 + 2 + c, 3 + 5))  # module 1 replays, the last does not
    cm = 0.5 + 50 / 100  # a micro-batch's boundary message
    fill = [1 / 2 + cm, 3 / 2]
    drain = [2 / 2 + cm, 5 / 2]
    assert t["gpipe"] == pytest.approx(sum(fill) + max(fill) + sum(drain) + max(drain))
    assert t["1f1b"] == t["gpipe"]  # the same bubble; 1F1B differs in memory
    assert t["gpipe_loop"] == pytest.approx(sum(fill) + max(fill) + t["gpipe"])  # the wrapper's forward-only pass
    single = simulate(us, [], link)
    assert single["fr"] == single["bp"] == single["gpipe"] == single["ddp"] == pytest.approx(11.0)


def test_simulate_uses_the_profile_of_a_smaller_batch_where_given():
    us = units([(1.0, 2.0, 100), (2.0, 4.0, 200), (1.0, 1.0, 300)])
    half = units([(0.75, 1.5, 50), (1.25, 3.0, 100), (0.5, 0.75, 150)])  # a half batch: more than half the time
    link = Link(bandwidth=100.0, latency=0.5)
    t = simulate(us, [1], link, microbatches=2, replicas=2, smaller={2: half})
    cm = 0.5 + 50 / 100
    fill = [0.75 + cm, 1.25 + 0.5]
    drain = [1.5 + cm, 3.0 + 0.75]
    assert t["gpipe"] == pytest.approx(sum(fill) + max(fill) + sum(drain) + max(drain))
    assert t["ddp"] == pytest.approx(0.75 + 1.5 + 1.25 + 3.0 + 0.5 + 0.75 + 2 * 0.5)  # B/2 each, then all-reduce
    assert t["fr"] == simulate(us, [1], link)["fr"]  # FR runs the whole batch
    assert simulate(us, [1], link, microbatches=4, smaller={2: half})["gpipe"] == simulate(us, [1], link, 4)["gpipe"]


def test_simulate_ddp():
    us = [UnitProfile("a", 1.0, 2.0, 100, 1000), UnitProfile("b", 3.0, 2.0, 100, 1500)]  # 2500 params: 10 kB
    link = Link(bandwidth=1000.0, latency=0.25)
    for d in (2, 4):
        # B/d samples per device, then a ring all-reduce: 2 (d-1) messages of 10 kB / d each.
        expected = 8.0 / d + 2 * (d - 1) * (0.25 + 10_000 / d / 1000.0)
        assert simulate(us, [1], link, replicas=d)["ddp"] == pytest.approx(expected)


def test_best_fr_cut_is_optimal():
    rng = random.Random(0)
    link = Link(bandwidth=1e3, latency=0.01)
    for _ in range(30):
        n, k = rng.randint(2, 7), rng.randint(1, 3)
        if k > n:
            continue
        us = units([(rng.random(), rng.random(), rng.randint(0, 1000)) for _ in range(n)])

        def fr_step(starts):
            return simulate(us, list(starts), link)["fr"]

        brute = min(fr_step(c) for c in itertools.combinations(range(1, n), k - 1))
        assert fr_step(best_fr_cut(us, k, link)) == pytest.approx(brute)


def test_profile_measures_every_unit_and_leaves_the_model_alone():
    model = mlp(depth=4, width=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile(model, (torch.randn(64, 8),), repeats=1)
    assert [u.name for u in prof] == [str(i) for i in range(len(model))]
    assert all(u.forward_s > 0 and u.backward_s > 0 for u in prof)
    assert prof[0].output_bytes == 64 * 32 * 4 and prof[-1].output_bytes == 64 * 4 * 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(u.input_backward_s is None for u in prof)
    split = profile(model, (torch.randn(64, 8),), repeats=1, split_backward=True)  # as the zero-bubble schedules run
    assert all(u.input_backward_s > 0 and u.weight_backward_s > 0 for u in split)
    assert all(p.grad is None for p in model.parameters())
    rows = recommend(prof, max_modules=3)
    assert [r["K"] for r in rows] == [1, 2, 3] and rows[0]["fr_speedup"] == pytest.approx(1.0)
    assert all(len(r["split_points"]) == r["K"] - 1 for r in rows)


def _main(argv, capsys):
    from replay_opt.plan import main

    main(argv)
    return capsys.readouterr().out


def test_the_cli_plans_a_function_of_any_module(tmp_path, capsys):
    source = tmp_path / "my_models.py"
    source.write_text(
        "import torch\ndef tower():\n    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])\n"
    )
    out = _main([f"--model={source}:tower", "--input-shape", "16", "--batch-size", "8", "--max-modules", "2",
                 "--device", "cpu"], capsys)  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "FR: K=" in out and "recommended: " in out
    assert any(rows[1].startswith(f"| 2 | {unit} |") for unit in "123")  # K=2 cut at one of the tower's layers


def test_the_cli_plans_a_transformers_model_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    out = _main([f"--model={tmp_path / 'gpt2'}", "--batch-size", "4", "--seq-len", "16", "--max-modules", "2",
                 "--device", "cpu"], capsys)  # fmt: skip
    assert "FR: K=" in out and "recommended: " in out
    split = re.search(r"^\| 2 \| (\S+) \|", out, re.M).group(1)  # (where depends on the measured times)
    assert split in candidate_units(transformers.GPT2LMHeadModel(config))


def test_a_model_spec_without_a_form_names_the_forms():
    from replay_opt._model_spec import load_model

    with pytest.raises(ValueError, match="package.module:function"):
        load_model("resnet110")


def test_the_library_imports_nothing_from_recipes():
    import ast
    import pathlib

    import replay_opt

    for path in pathlib.Path(replay_opt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "recipes" or n.startswith("recipes.") for n in names), path


def test_two_stages_per_rank_formulas():
    # Four stages on K=2 ranks. Per micro-batch (M=2 halves the full-batch times): forward f, backward b.
    us = units([(2.0, 4.0, 100), (4.0, 8.0, 200), (2.0, 2.0, 300), (2.0, 6.0, 400)])
    link = Link(bandwidth=100.0, latency=0.5)
    t = simulate_two_per_rank(us, [1, 2, 3], link, microbatches=2)
    f = [1.0, 2.0, 1.0, 1.0]
    b = [2.0, 4.0, 1.0, 3.0]
    c = [0.5 + 50 / 100, 0.5 + 100 / 100, 0.5 + 150 / 100]  # a micro-batch's message after stages 0, 1, 2

    def expected(ranks, bubble_of, b_in=None, w=None):
        b_in = b_in or [x / 2 for x in b]  # the zero-bubble split: input pass, weight pass (unprofiled: halves)
        w = w or [x / 2 for x in b]

        def per_rank(times, message):
            return [sum(times[i] + message(i) for i in range(4) if ranks[i] == r) for r in (0, 1)]

        fr = per_rank(f, lambda i: c[i] if i < 3 and ranks[i + 1] != ranks[i] else 0)
        down = lambda i: c[i - 1] if i > 0 and ranks[i - 1] != ranks[i] else 0  # noqa: E731 (sent by the B pass)
        br, bi, wr = per_rank(b, down), per_rank(b_in, down), per_rank(w, lambda i: 0)
        if bubble_of is None:  # interleaved 1F1B: the backward not split
            r = max((0, 1), key=lambda r: fr[r] + br[r])
            return 2 * (fr[r] + br[r]) + (2 - 1) * (fr[r] + br[r]) / 2
        r = max((0, 1), key=lambda r: fr[r] + bi[r] + wr[r])
        return 2 * (fr[r] + bi[r] + wr[r]) + (2 - 1) * bubble_of(fr[r], bi[r], wr[r]) / 2

    loop, v = [0, 1, 0, 1], [0, 1, 1, 0]  # interleaved: rank r holds r, r+K; V: r, 2K-1-r
    zb_h1 = lambda f_, b_, w_: max(f_ + b_ - w_, 0)  # noqa: E731
    zb_h2 = lambda f_, b_, w_: max(f_ + b_ - 2 * w_, 0)  # noqa: E731
    dualpipe = lambda f_, b_, w_: max(f_ + 2 * b_ - 3 * w_, 0)  # noqa: E731
    assert t["i1f1b"] == pytest.approx(expected(loop, None))
    assert t["izb"] == pytest.approx(expected(loop, zb_h1))
    assert t["zbv"] == pytest.approx(expected(v, zb_h2))
    assert t["dualpipev"] == pytest.approx(expected(v, dualpipe))
    # Profiled split passes (full batch; M=2 halves them): the two cost more than the backward they replace.
    for u, (b_in, w) in zip(us, [(1.0, 4.0), (5.0, 6.0), (1.0, 2.0), (4.0, 4.0)]):
        u.input_backward_s, u.weight_backward_s = b_in, w
    t = simulate_two_per_rank(us, [1, 2, 3], link, microbatches=2)
    b_in, w = [0.5, 2.5, 0.5, 2.0], [2.0, 3.0, 1.0, 2.0]
    assert t["i1f1b"] == pytest.approx(expected(loop, None))  # (not split)
    assert t["izb"] == pytest.approx(expected(loop, zb_h1, b_in, w))
    assert t["zbv"] == pytest.approx(expected(v, zb_h2, b_in, w))
    assert t["dualpipev"] == pytest.approx(expected(v, dualpipe, b_in, w))
    with pytest.raises(ValueError, match="even number of stages"):
        simulate_two_per_rank(us[:3], [1, 2], link)


def test_recommend_names_the_fastest_prediction_among_what_a_user_can_run():
    from replay_opt.plan import CHOICES

    # Heavy units with large parameters (DDP's all-reduce is costly) and light activations: a pipeline wins.
    us = [UnitProfile(f"u{i}", 1.0, 2.0, 10, 10**9) for i in range(8)]
    rows = recommend(us, 4, Link(bandwidth=1e9, latency=1e-4), microbatches=8)
    for r in rows[1:]:
        times = {c: r[c + "_s"] for c in CHOICES if c + "_s" in r}
        assert r["fastest"] == min(times, key=times.get) and r["fastest"] != "ddp"
        assert r["fastest_speedup"] == pytest.approx(r["one_device_s"] / times[r["fastest"]])
    assert {"i1f1b_s", "zbv_s", "dualpipev_s"} <= set(rows[3])  # 2K = 8 stages, M = 8 micro-batches
    assert "zbv_s" not in recommend(us, 4, microbatches=4)[3]  # they need M >= 2K
    # Tiny parameters, a slow link between stages, big activations: DDP wins.
    us = [UnitProfile(f"u{i}", 1.0, 2.0, 10**10, 10) for i in range(8)]
    assert recommend(us, 2, Link(bandwidth=1e9, latency=1e-4))[1]["fastest"] == "ddp"


def test_a_tied_weight_makes_fr_and_ddg_wait_for_the_last_modules_backward():
    # u0 and u3 share a 10-element parameter (a tied embedding and head); modules [u0, u1], [u2], [u3].
    us = units([(1.0, 2.0, 100), (2.0, 4.0, 200), (3.0, 5.0, 300), (1.0, 3.0, 400)])
    us[0].tied, us[0].tied_params = (3,), 10
    us[3].tied, us[3].tied_params = (0,), 10
    link = Link(bandwidth=100.0, latency=0.5)
    c = [0.5 + 200 / 100, 0.5 + 300 / 100]  # the activations after modules 1 and 2
    exchange = 0.5 + 40 / 100  # the tied gradient, fp32
    t = simulate(us, [2, 3], link)
    # Module 1's next forward waits for: forwards of modules 1, 2, 3 (and their messages), module 3's backward,
    # the exchange -- longer here than any module's own work (FR: 2*3 + 6 + c1, 2*3 + 5 + c2, 1 + 3).
    chain = 3.0 + c[0] + 3.0 + c[1] + 1.0 + 3.0 + exchange
    assert t["fr"] == pytest.approx(max(2 * 3 + 6 + c[0], 2 * 3 + 5 + c[1], 4.0, chain)) == pytest.approx(chain)
    assert t["ddg"] == pytest.approx(chain)
    # Tied modules 1 and 2 of 3: module 2 replays (FR) before its backward; DDG does not.
    us[3].tied, us[3].tied_params, us[2].tied, us[2].tied_params = (), 0, (0,), 10
    us[0].tied = (2,)
    t = simulate(us, [2, 3], link)
    assert t["fr"] == pytest.approx(max(2 * 3 + 6 + c[0], 3.0 + c[0] + 3.0 + 3.0 + 5.0 + exchange))
    assert t["ddg"] == pytest.approx(max(3 + 6 + c[0], 3.0 + c[0] + 3.0 + 5.0 + exchange))
    # Nothing shared within a module: no wait.
    assert simulate(us, [3], link)["ddg"] == pytest.approx(max(6 + 11 + c[1], 4.0))


def test_best_fr_cut_is_optimal_with_a_tied_weight():
    rng = random.Random(1)
    link = Link(bandwidth=1e3, latency=0.01)
    for _ in range(20):
        n, k = rng.randint(3, 7), rng.randint(2, 3)
        us = units([(rng.random(), rng.random(), rng.randint(0, 1000)) for _ in range(n)])
        us[0].tied, us[-1].tied, us[0].tied_params, us[-1].tied_params = (n - 1,), (0,), 100, 100

        def fr_step(starts):
            return simulate(us, list(starts), link)["fr"]

        brute = min(fr_step(c) for c in itertools.combinations(range(1, n), k - 1))
        assert fr_step(best_fr_cut(us, k, link)) == pytest.approx(brute)


def test_profile_finds_the_units_that_share_a_parameter():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
            self.head = torch.nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    prof = profile(TiedLM(), (torch.randint(0, 50, (4, 8)),), repeats=1)
    by_name = {u.name: (i, u) for i, u in enumerate(prof)}
    (e, embed), (h, head) = by_name["embed"], by_name["head"]
    assert embed.tied == (h,) and head.tied == (e,) and embed.tied_params == head.tied_params == 50 * 16
    assert all(u.tied == () and u.tied_params == 0 for u in prof if u.name not in ("embed", "head"))


def test_calibrated_scales_each_profile_to_the_whole_step_timed_on_its_batch():
    from replay_opt.plan import calibrated

    full = units([(1.0, 2.0, 100), (3.0, 4.0, 200)])  # the units add up to 10 s
    half = units([(0.5, 1.0, 50), (1.0, 2.5, 100)])  # ... and to 5 s on half the batch
    out = calibrated({1: full, 2: half}, {1: 12.0, 2: 4.0})
    assert [t for u in out[1] for t in (u.forward_s, u.backward_s)] == pytest.approx([1.2, 2.4, 3.6, 4.8])
    assert [t for u in out[2] for t in (u.forward_s, u.backward_s)] == pytest.approx([0.4, 0.8, 0.8, 2.0])
    assert [u.output_bytes for u in out[2]] == [50, 100] and full[0].forward_s == 1.0  # (copies)
    assert calibrated({4: half}, {})[4] == half  # not timed: as profiled


def test_step_seconds_times_the_whole_model_on_each_batch_and_leaves_it_alone():
    from replay_opt.plan import step_seconds

    model = mlp(depth=4, width=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = step_seconds(model, {1: (torch.randn(64, 8),), 4: (torch.randn(16, 8),)}, repeats=2)
    assert set(seconds) == {1, 4} and all(s > 0 for s in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
