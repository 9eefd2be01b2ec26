"""One prepared GPU run: CUDA correctness, bf16 autocast, step time, peak memory, micro-batch curves, LM recipe speed.

On a machine with one NVIDIA GPU (H100/H200 class), from the repository root, with a CUDA build of torch::

    pip install -e ".[recipes]" "transformers>=4.50"     # the GPT-2 sections and the LM recipe need transformers
    python -m bench.gpu --out bench/results/gpu           # 2-4 minutes expected (not yet timed on a GPU)

It writes ``<out>/gpu.md`` (markdown tables) and ``<out>/gpu.json`` (every figure), both headed by
``torch.cuda.get_device_name()`` and the torch / CUDA / transformers versions, and exits with status 1 when a
correctness check fails or cannot run (section 1, or section 2: a non-finite bf16 loss).  Sections:

1. **CUDA correctness** (fp32, TF32 off, deterministic cuDNN): ``method="bp"`` at K = 2 and 4 equals plain
   autograd on a copy of the same model (ResNet and GPT-2, same batches, SGD with momentum, 3 steps), and
   ``method="fr"`` equals the tests' naive Algorithm 1, written out by hand (``tests/naive.py``), each to <= 1e-5
   max abs weight difference.
2. **bf16 autocast**: FR (K = 2) trains a few steps under ``torch.autocast(device_type, torch.bfloat16)``; the
   losses must be finite.
3. **Step time**, one process, K modules on one device: the wrapper (bp, fr, ddg at K = 2, 4) against the model's
   own plain step, ResNet-110 at batch 128 (32x32) and a GPT-2-small-like model (12 x 768, vocabulary 50257) at
   8 x 512 tokens; median of the timed steps of interleaved rounds, ``torch.cuda.synchronize`` around each step.
   On one device the K modules run one after another: this measures each method's *work*, not its speed-up.
4. **Peak CUDA memory** per method (bp, fr, ddg, dni, dgl at K = 2, 4) on ResNet-110 -- the paper's Figure 5 --
   with the wrapper's own accounting (``track_memory=True``), as ratios to BP.
5. **Micro-batch efficiency**: the plain model's forward+backward time per sample at batch B/M, M = 1..16,
   relative to the full batch -- what a pipeline planner needs to predict GPipe / 1F1B.
6. **LM recipe**: ``recipes/causal_lm.py`` (FR, K = 2, gpt2-tiny on the bundled Python-stdlib corpus), run in
   this process for 200 steps; steps/s between its two evaluations.

Every section is wrapped: a failure is recorded (its traceback in the JSON and the markdown) and the others
still run.  Past ``--budget-s`` seconds (default 420, so the run ends within 8 minutes) the remaining heavy sections
(and the remaining models or configurations inside sections 3-5) are skipped with a note.
``--quick`` shrinks everything (K = 2 only; ResNet-8 at batch 16, 8 for memory; GPT-2 2 x 64 with 512 tokens at
4 x 32; 1 timed step; M <= 4; 1 CPU thread) for a smoke run:
``python -m bench.gpu --device cpu --quick --out /tmp/g`` takes about 25 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recipes.models import build_model
from replay_opt import ReplayModelWrapper, ReplayOptimizer
from replay_opt.cut.balance import synchronizer

TOLERANCE = 1e-5
STEP_METHODS = ("bp", "fr", "ddg")
MEMORY_METHODS = ("bp", "fr", "ddg", "dni", "dgl")


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Sizes of one run: the full GPU run, or ``--quick``."""

    device: str
    quick: bool
    resnet: str = "resnet110"
    resnet_batch: int = 128
    memory_batch: int = 128
    gpt: dict = field(default_factory=lambda: {"n_layer": 12, "n_embd": 768, "n_head": 12})
    gpt_batch: int = 8
    gpt_seq: int = 512
    check_gpt: dict = field(default_factory=lambda: {"n_layer": 4, "n_embd": 256, "n_head": 4})
    check_resnet_batch: int = 32
    check_gpt_batch: int = 4
    check_gpt_seq: int = 64
    vocab: int = 50257
    ks: tuple[int, ...] = (2, 4)
    rounds: int = 3
    steps: int = 5  # timed steps per configuration and round
    bf16_steps: int = 5
    microbatches: tuple[int, ...] = (1, 2, 4, 8, 16)
    lm: dict = field(default_factory=lambda: {"batch_size": 16, "block_size": 128, "eval_every": 100, "steps": 200})

    @classmethod
    def make(cls, device: str, quick: bool) -> Settings:
        if not quick:
            return cls(device=device, quick=False)
        tiny = {"n_layer": 2, "n_embd": 64, "n_head": 2}
        return cls(
            device=device, quick=True, resnet="resnet8", resnet_batch=16, memory_batch=8, gpt=tiny, gpt_batch=4,
            ks=(2,), gpt_seq=32, check_gpt=tiny, check_resnet_batch=8, check_gpt_batch=2, check_gpt_seq=32, vocab=512,
            rounds=2, steps=1, bf16_steps=3, microbatches=(1, 2, 4),
            lm={"batch_size": 4, "block_size": 32, "eval_every": 3, "steps": 6},
        )  # fmt: skip


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_fp32():
    """Deterministic cuDNN, no TF32: what the correctness checks need; restored afterwards."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved


# ----------------------------------------------------------------------------------------------- models


class Task:
    """A model family: how to build it, make a batch, and compute its training loss."""

    name: str

    def build(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, size: int, seed: int, device: str) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def split(self, batch: Any, parts: int) -> list[Any]:
        raise NotImplementedError


class ResNetTask(Task):
    def __init__(self, name: str) -> None:
        self.name = name

    def build(self) -> nn.Module:
        return build_model(self.name, 10)

    def batch(self, size: int, seed: int, device: str) -> Any:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(size, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (size,), generator=g)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def split(self, batch: Any, parts: int) -> list[Any]:
        x, y = batch
        return list(zip(x.chunk(parts), y.chunk(parts)))


class GPT2Task(Task):
    """A transformers GPT-2 trained the Hugging Face way: ``model(input_ids=ids, labels=ids).loss``."""

    def __init__(self, sizes: dict, vocab: int, seq: int, *, exact: bool = False) -> None:
        self.sizes, self.vocab, self.seq, self.exact = sizes, vocab, seq, exact
        self.name = f"gpt2 {sizes['n_layer']}x{sizes['n_embd']}"

    def build(self) -> nn.Module:
        import transformers

        extra: dict[str, Any] = {}
        if self.exact:  # no dropout, no fused attention kernels: the correctness check compares weights exactly
            extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        config = transformers.GPT2Config(
            vocab_size=self.vocab, n_positions=1024, use_cache=False, bos_token_id=self.vocab - 1,
            eos_token_id=self.vocab - 1, **self.sizes, **extra,
        )  # fmt: skip
        if self.exact:
            config._attn_implementation = "eager"
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"
        return model

    def batch(self, size: int, seed: int, device: str) -> Any:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab, (size, self.seq), generator=g).to(device)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    def split(self, batch: Any, parts: int) -> list[Any]:
        return list(batch.chunk(parts))


def fresh(task: Task, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return task.build().to(device)


class Trainer:
    """One configuration: the plain model (``method="plain"``) or the wrapper with a method and K.

    No ``example_inputs=``: a model that needs torch.export (GPT-2) is captured at its first forward, as in
    an Accelerate loop -- under autocast when the forward runs under it.
    """

    def __init__(self, task: Task, model: nn.Module, method: str, k: int, lr: float, **wrap: Any):
        self.task, self.method, self.k = task, method, k
        if method == "plain":
            self.model: nn.Module = model
            self.opt: Any = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        else:
            self.model = ReplayModelWrapper(model, num_modules=k, method=method, **wrap)
            self.opt = ReplayOptimizer(torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9), self.model)

    @property
    def split_points(self) -> list[str]:
        return [] if self.method == "plain" else list(self.model.split_points)

    def step(self, batch: Any) -> torch.Tensor:
        loss = self.task.loss(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.detach()

    @property
    def label(self) -> str:
        return "plain (no wrapper)" if self.method == "plain" else f"{self.method} K={self.k}"


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.detach() - q.detach()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# The tests' naive Algorithm 1 (tests/naive.py): independent of replay_opt, written out by hand.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from naive import SmallResNet, naive_features_replay, sequential_stages  # noqa: E402


def mlp(depth: int = 6, width: int = 64, inputs: int = 32, classes: int = 10) -> nn.Sequential:
    """A deep tanh MLP as an nn.Sequential: Linear, Tanh, Linear, Tanh, ..., Linear."""
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def fr_against_naive(case: str, device: str) -> float:
    """FR through the library against the naive Algorithm 1 on a copy of the same model; max abs weight diff."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case.startswith("mlp"):
        k = int(case.split("K=")[1])
        model = mlp().to(device)
        reference = copy.deepcopy(model)
        split = {2: [6], 3: [4, 8], 4: [2, 6, 8]}[k]
        data = [(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in [16] * 7 + [5]]
        stages = sequential_stages(reference, split)
        split_points = [str(i) for i in split]

        def make_opt(p):
            return torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)

    else:  # the traced ResNet at K=3, as tests/test_fr.py
        model = SmallResNet(16).to(device)
        ref = copy.deepcopy(model)
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), ref.fc)
        stem = [ref.conv, ref.bn, nn.ReLU()]
        stages = [
            nn.Sequential(*stem, ref.blocks[0]),
            nn.Sequential(*ref.blocks[1:3]),
            nn.Sequential(ref.blocks[3], head),
        ]
        split_points = ["blocks.1", "blocks.3"]
        reference = ref
        data = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(6)]

        def make_opt(p):
            return torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)

    data = [(x.to(device), y.to(device)) for x, y in data]
    naive_features_replay(stages, data, make_opt)
    wrapper = ReplayModelWrapper(model, split_points=split_points)
    opt = ReplayOptimizer(make_opt(wrapper.parameters()), wrapper)
    for x, y in data:
        F.cross_entropy(wrapper(x), y).backward()
        opt.step()
        opt.zero_grad()
    return max_weight_diff(model, reference)


def bp_against_autograd(task: Task, ks: Sequence[int], batch: int, device: str, steps: int = 3) -> dict[int, float]:
    """``method="bp"`` at K modules against plain autograd on a copy of the same model, same batches.

    One copy is wrapped for every K, reset to the initial weights each time (so it is captured once).
    """
    base = fresh(task, device)
    reference, model = copy.deepcopy(base), copy.deepcopy(base)
    data = [task.batch(batch, seed=100 + i, device=device) for i in range(steps)]
    plain = Trainer(task, reference, "plain", 1, lr=0.05)
    for b in data:
        plain.step(b)
    diffs = {}
    for k in ks:
        model.load_state_dict(base.state_dict())
        wrapped = Trainer(task, model, "bp", k, lr=0.05)
        for b in data:
            wrapped.step(b)
        diffs[k] = max_weight_diff(reference, model)
    return diffs


# ----------------------------------------------------------------------------------------------- sections


def section_correctness(s: Settings, out: Path) -> dict:
    rows = []
    with exact_fp32():
        resnet = ResNetTask(s.resnet)
        gpt = GPT2Task(s.check_gpt, s.vocab, s.check_gpt_seq, exact=True)
        for task, batch in ((resnet, s.check_resnet_batch), (gpt, s.check_gpt_batch)):
            for k, diff in bp_against_autograd(task, s.ks, batch, s.device).items():
                rows.append({"check": "bp == plain autograd", "model": f"{task.name}, batch {batch}", "K": k,
                             "max_abs_diff": diff, "passed": diff <= TOLERANCE})  # fmt: skip
            free_memory(s.device)
        for case in ("mlp K=2", "mlp K=4", "traced resnet K=3"):
            diff = fr_against_naive(case, s.device)
            name, k = case.rsplit(" K=", 1)
            rows.append({"check": "fr == naive Algorithm 1", "model": name, "K": int(k), "max_abs_diff": diff,
                         "passed": diff <= TOLERANCE})  # fmt: skip
    return {
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
        "tolerance": TOLERANCE,
        "notes": ["fp32, TF32 off, cudnn.deterministic; GPT-2 without dropout and with eager attention; "
                  "SGD(lr 0.05, momentum 0.9), 3 steps for bp; 6-8 steps (past the pipeline fill) for fr"],
    }  # fmt: skip


def section_bf16(s: Settings, out: Path) -> dict:
    device_type = torch.device(s.device).type
    rows = []
    for task, batch in ((ResNetTask(s.resnet), s.resnet_batch), (GPT2Task(s.gpt, s.vocab, s.gpt_seq), s.gpt_batch)):
        base = fresh(task, s.device)
        data = [task.batch(batch, seed=200 + i, device=s.device) for i in range(s.bf16_steps)]
        with torch.autocast(device_type, dtype=torch.bfloat16), torch.no_grad():
            plain_first = task.loss(copy.deepcopy(base).train(), data[0]).float().item()
        trainer = Trainer(task, base, "fr", 2, lr=0.01)
        losses = []
        for b in data:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = task.loss(trainer.model, b)
            loss.backward()
            trainer.opt.step()
            trainer.opt.zero_grad()
            losses.append(loss.float().item())
        finite = all(math.isfinite(v) for v in losses)
        rows.append({"model": task.name, "batch": batch, "method": "fr", "K": 2, "losses": losses,
                     "plain_first_loss": plain_first, "finite": finite, "passed": finite})  # fmt: skip
        del trainer, base
        free_memory(s.device)
    return {
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
        "notes": [f"torch.autocast({device_type!r}, dtype=torch.bfloat16) around the forward and loss; "
                  "fp32 weights, SGD(lr 0.01, momentum 0.9); 'plain first loss' is the unwrapped model's loss on "
                  "the first batch (FR's first loss should be close to it: same weights, same batch)"],
    }  # fmt: skip


def section_step_time(s: Settings, out: Path, deadline: float) -> dict:
    rows, notes = [], []
    sync = synchronizer(s.device)
    models = [(ResNetTask(s.resnet), s.resnet_batch), (GPT2Task(s.gpt, s.vocab, s.gpt_seq), s.gpt_batch)]
    for task, batch in models:
        if time.perf_counter() > deadline:
            notes.append(f"{task.name}: skipped, past the time budget")
            continue
        data = task.batch(batch, seed=300, device=s.device)
        # One model object for every wrapped configuration: captured once (a capture is cached per model object),
        # weights shared; each wrapper has its own optimizer and pipeline state.
        model = fresh(task, s.device)
        # (the plain run trains a copy: the model inside a wrapper trains through it only, replay_opt/bypass.py)
        trainers = [Trainer(task, copy.deepcopy(model), "plain", 1, lr=1e-3)]
        trainers += [Trainer(task, model, method, k, lr=1e-3) for k in s.ks for method in STEP_METHODS]
        times: dict[str, list[float]] = {t.label: [] for t in trainers}
        first_step_s: dict[str, float] = {}
        for r in range(s.rounds):  # interleaved, in a rotating order, so drift hits every configuration alike
            order = trainers[r % len(trainers) :] + trainers[: r % len(trainers)]
            for t in order:
                for i in range(t.k + 2 if r == 0 else 1):  # warm-up (the first round also fills the pipeline)
                    start = time.perf_counter()
                    t.step(data)
                    if r == 0 and i == 0:
                        sync()
                        first_step_s[t.label] = time.perf_counter() - start  # with the capture, for the first
                for _ in range(s.steps):
                    sync()
                    start = time.perf_counter()
                    t.step(data)
                    sync()
                    times[t.label].append(time.perf_counter() - start)
        plain_s = statistics.median(times[trainers[0].label])
        for t in trainers:
            step_s = statistics.median(times[t.label])
            rows.append({
                "model": task.name, "batch": batch, "tokens_per_sample": getattr(task, "seq", None),
                "config": t.label, "method": t.method, "K": t.k, "step_s": step_s, "step_times_s": times[t.label],
                "samples_per_s": batch / step_s, "ratio_to_plain": step_s / plain_s, "split_points": t.split_points,
                "first_step_s": first_step_s[t.label],
            })  # fmt: skip
        del trainers, model, data
        free_memory(s.device)
    notes.append(
        f"median of {s.rounds} interleaved rounds x {s.steps} timed steps per configuration (warm-up: K+2 steps in "
        "the first round, 1 in later ones); SGD momentum; same batch every step; the K modules run one after another "
        "on this one device, so ratios measure each method's work, not a speed-up; every configuration wraps the "
        "same model object (one capture, shared weights), each with its own optimizer and pipeline state"
    )
    return {"rows": rows, "notes": notes}


def section_memory(s: Settings, out: Path, deadline: float) -> dict:
    task = ResNetTask(s.resnet)
    cuda = s.device.startswith("cuda")
    base = task.build()  # on the CPU; each configuration moves its own copy
    data = [task.batch(s.memory_batch, seed=400 + i, device=s.device) for i in range(max(s.ks) + 2)]
    rows, notes = [], []
    configs = [("plain", 1)] + [(m, k) for k in s.ks for m in MEMORY_METHODS]
    for method, k in configs:
        if time.perf_counter() > deadline:
            notes.append(f"{method} K={k}: skipped, past the time budget")
            continue
        free_memory(s.device)
        if cuda:
            start_bytes = torch.cuda.memory_allocated(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
        wrap = {} if method == "plain" else {"track_memory": True}
        trainer = Trainer(task, copy.deepcopy(base).to(s.device), method, k, lr=0.01, **wrap)
        for b in data[: k + 2]:  # past the pipeline fill
            trainer.step(b)
        peak = (torch.cuda.max_memory_allocated(s.device) - start_bytes) / 2**20 if cuda else None
        held = None
        if method != "plain":  # the wrapper's own accounting of the last step
            report = trainer.model.memory_report()
            held = {c: report[c] / 2**20 for c in ("total", "activations", "retained_graphs", "history",
                                                     "stale_gradients")}  # fmt: skip
        rows.append({"model": task.name, "batch": s.memory_batch, "method": method, "K": k, "cuda_peak_mib": peak,
                     "held_mib": held})  # fmt: skip
        del trainer
    free_memory(s.device)
    for r in rows:
        k = s.ks[0] if r["method"] == "plain" else r["K"]  # the plain model against bp at the smallest K
        bp = next((b for b in rows if b["method"] == "bp" and b["K"] == k), None)
        r["peak_ratio_to_bp"] = r["cuda_peak_mib"] / bp["cuda_peak_mib"] if bp and bp["cuda_peak_mib"] else None
        r["held_ratio_to_bp"] = (
            r["held_mib"]["total"] / bp["held_mib"]["total"] if bp and r["held_mib"] and bp["held_mib"] else None
        )
    notes.append(
        "CUDA peak: torch.cuda.max_memory_allocated over K+2 training steps minus what was allocated before the model "
        "was moved to the device (weights, gradients, momentum, activations, histories, auxiliary networks); held for "
        "backward: wrapper.memory_report()['total'] (track_memory=True) on the last step; ratios to bp at the same K "
        f"(the plain model's: to bp at K={s.ks[0]})" + ("" if cuda else "; no CUDA peak on a CPU")
    )
    return {"rows": rows, "notes": notes}


def section_microbatch(s: Settings, out: Path, deadline: float) -> dict:
    sync = synchronizer(s.device)
    rows, notes = [], []
    models = [(ResNetTask(s.resnet), s.resnet_batch), (GPT2Task(s.gpt, s.vocab, s.gpt_seq), s.gpt_batch)]
    for task, batch in models:
        if time.perf_counter() > deadline:
            notes.append(f"{task.name}: skipped, past the time budget")
            continue
        model = fresh(task, s.device)
        full = task.batch(batch, seed=500, device=s.device)
        ms = [m for m in s.microbatches if batch % m == 0]
        skipped = [m for m in s.microbatches if batch % m]
        if skipped:
            notes.append(f"{task.name}: M = {skipped} skipped (batch {batch} is not divisible)")
        micro = {m: task.split(full, m)[0] for m in ms}
        times: dict[int, list[float]] = {m: [] for m in ms}

        for m in ms:  # warm-up each shape
            for _ in range(2):
                task.loss(model, micro[m]).backward()
        for r in range(s.rounds):
            for m in ms[r % len(ms) :] + ms[: r % len(ms)]:
                for _ in range(max(s.steps, 2)):
                    sync()
                    start = time.perf_counter()
                    task.loss(model, micro[m]).backward()
                    sync()
                    times[m].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        full_per_sample = statistics.median(times[1]) / batch
        for m in ms:
            t = statistics.median(times[m])
            size = batch // m
            rows.append({
                "model": task.name, "batch": batch, "M": m, "microbatch": size, "fwd_bwd_s": t,
                "per_sample_s": t / size, "throughput_vs_full": full_per_sample / (t / size),
                "m_microbatches_vs_full": m * t / (full_per_sample * batch),
            })  # fmt: skip
        del model, full, micro
        free_memory(s.device)
    notes.append(
        "the plain model's forward+backward (no optimizer step, gradients accumulating as in a pipeline) on one "
        "micro-batch of B/M samples; throughput relative to the full batch = per-sample time at B / per-sample time "
        "at B/M; 'M x t(B/M) / t(B)' is the pure compute of M micro-batches in sequence"
    )
    return {"rows": rows, "notes": notes}


def section_lm_recipe(s: Settings, out: Path) -> dict:
    from recipes.causal_lm import main as recipe_main

    lm = s.lm
    if not s.device.startswith("cuda"):
        os.environ["ACCELERATE_USE_CPU"] = "1"  # Accelerate would take the GPU if there is one
    out_dir = out / "lm_recipe"
    argv = ["--method", "fr", "--modules", "2", "--steps", str(lm["steps"]), "--eval-every", str(lm["eval_every"]),
            "--batch-size", str(lm["batch_size"]), "--block-size", str(lm["block_size"]), "--val-blocks", "2",
            "--warmup", "2", "--log-every", str(lm["steps"]), "--report-to", "none", "--output-dir", str(out_dir),
            "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    results = recipe_main(argv)
    wall = time.perf_counter() - start
    tokens_per_step = lm["batch_size"] * lm["block_size"]
    marks = [(h["step"], h["step"] * tokens_per_step / h["perf/tokens_per_s"]) for h in results["history"]]
    (s1, e1), (s2, e2) = marks[0], marks[-1]
    steady = (s2 - s1) / (e2 - e1) if s2 > s1 else None
    row = {
        "model": results["model"], "method": results["method"], "K": results["modules"],
        "batch_size": lm["batch_size"], "block_size": lm["block_size"], "steps": results["steps"],
        "steps_per_s": steady, "steps_per_s_overall": s2 / e2,
        "tokens_per_s": steady * tokens_per_step if steady else None,
        "final_val_perplexity": results["final_val_perplexity"], "wall_s": wall, "argv": argv,
    }  # fmt: skip
    return {
        "rows": [row],
        "notes": [f"recipes/causal_lm.py main() in this process (python recipes/causal_lm.py {' '.join(argv)}); "
                  f"steps/s between its evaluations at steps {s1} and {s2} (from its perf/tokens_per_s; includes one "
                  "checkpoint save and an evaluation of 2 validation blocks); 'overall' counts from the first step"],
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- report


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "pass" if v else "**FAIL**"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def section_markdown(key: str, sec: dict) -> list[str]:
    rows = sec.get("rows") or []
    if key == "correctness":
        return table(
            ["check", "model", "K", "max abs weight diff", "tolerance", "result"],
            [[r["check"], r["model"], r["K"], f"{r['max_abs_diff']:.2e}", f"{TOLERANCE:.0e}", r["passed"]]
             for r in rows],
        )  # fmt: skip
    if key == "bf16":
        return table(
            ["model", "batch", "method", "K", "losses per step", "plain model's first loss", "finite"],
            [[r["model"], r["batch"], r["method"], r["K"], ", ".join(f"{v:.4f}" for v in r["losses"]),
              f"{r['plain_first_loss']:.4f}", r["finite"]] for r in rows],
        )  # fmt: skip
    if key == "step_time":
        return table(
            ["model", "batch", "configuration", "step (ms)", "samples/s", "step / plain", "split points"],
            [[r["model"], r["batch"] if not r["tokens_per_sample"] else f"{r['batch']} x {r['tokens_per_sample']}",
              r["config"], f"{1000 * r['step_s']:.1f}", f"{r['samples_per_s']:.1f}", f"{r['ratio_to_plain']:.2f}",
              ", ".join(r["split_points"]) or "–"] for r in rows],
        )  # fmt: skip
    if key == "memory":
        return table(
            ["model", "batch", "method", "K", "CUDA peak (MiB)", "peak / bp", "held for backward (MiB)", "held / bp"],
            [[r["model"], r["batch"], r["method"], r["K"], fmt(r["cuda_peak_mib"], 1), fmt(r["peak_ratio_to_bp"], 2),
              fmt(r["held_mib"]["total"], 1) if r["held_mib"] else "–", fmt(r["held_ratio_to_bp"], 2)] for r in rows],
        )  # fmt: skip
    if key == "microbatch":
        return table(
            ["model", "batch B", "M", "micro-batch B/M", "fwd+bwd (ms)", "ms / sample", "throughput vs B",
             "M x t(B/M) / t(B)"],
            [[r["model"], r["batch"], r["M"], r["microbatch"], f"{1000 * r['fwd_bwd_s']:.2f}",
              f"{1000 * r['per_sample_s']:.3f}", f"{r['throughput_vs_full']:.2f}", f"{r['m_microbatches_vs_full']:.2f}"]
             for r in rows],
        )  # fmt: skip
    if key == "lm_recipe":
        return table(
            ["model", "method", "K", "batch x block", "steps", "steps/s", "steps/s (overall)", "tokens/s",
             "val perplexity", "wall (s)"],
            [[r["model"], r["method"], r["K"], f"{r['batch_size']} x {r['block_size']}", r["steps"],
              fmt(r["steps_per_s"], 2), fmt(r["steps_per_s_overall"], 2), fmt(r["tokens_per_s"], 0),
              fmt(r["final_val_perplexity"], 2), fmt(r["wall_s"], 1)] for r in rows],
        )  # fmt: skip
    return []


TITLES = {
    "correctness": "1. CUDA correctness",
    "bf16": "2. bf16 autocast",
    "step_time": "3. Step time, K modules in one process on one device",
    "memory": "4. Peak memory per method (the paper's Figure 5)",
    "microbatch": "5. Micro-batch efficiency",
    "lm_recipe": "6. LM recipe speed",
}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# bench.gpu on {env['device_name']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}; "
        f"{'quick' if report['quick'] else 'full'} run, {report['wall_s']:.0f} s wall, {report['date']}",
        "",
        f"`{report['command']}`",
        "",
        f"Correctness checks: **{'PASS' if report['checks_passed'] else 'FAIL'}**",
    ]
    for key, sec in report["sections"].items():
        lines += ["", f"## {TITLES[key]}", ""]
        status = sec["status"]
        if status == "error":
            lines += [f"**error** after {sec['seconds']:.1f} s:", "", "```", sec["error"].rstrip(), "```"]
            continue
        if status == "skipped":
            lines.append(f"skipped: {sec['reason']}")
            continue
        lines += section_markdown(key, sec)
        lines += [""] + [f"* {n}" for n in sec.get("notes", [])] + [f"* {sec['seconds']:.1f} s"]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    cuda = device.startswith("cuda")
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "transformers": tf_version,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


# ----------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for gpu.md and gpu.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and step counts (a smoke run, CPU included)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining heavy sections past this time")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: 1 for --quick on a CPU device, where a second busy process would otherwise "
        "slow 2 threads down many times over; else torch's default)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))
    threads = args.threads or (1 if args.quick and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    s = Settings.make(args.device, args.quick)
    report: dict[str, Any] = {
        "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "environment": environment(args.device),
        "settings": {k: v for k, v in vars(s).items()},
        "sections": {},
    }
    sections: list[tuple[str, Callable[[], dict], bool]] = [
        ("correctness", lambda: section_correctness(s, args.out), False),
        ("bf16", lambda: section_bf16(s, args.out), False),
        ("step_time", lambda: section_step_time(s, args.out, deadline), True),
        ("memory", lambda: section_memory(s, args.out, deadline), True),
        ("microbatch", lambda: section_microbatch(s, args.out, deadline), True),
        ("lm_recipe", lambda: section_lm_recipe(s, args.out), True),
    ]
    for key, run, heavy in sections:
        start = time.perf_counter()
        print(f"[bench.gpu] {TITLES[key]} (at {start - t0:.0f} s)", flush=True)
        if heavy and start > deadline:
            sec = {"status": "skipped", "reason": f"past the time budget ({args.budget_s:.0f} s)", "seconds": 0.0}
        else:
            try:
                sec = {"status": "ok", **run()}
            except Exception:  # recorded; the other sections still run
                sec = {"status": "error", "error": traceback.format_exc()}
                print(sec["error"], file=sys.stderr, flush=True)
            except SystemExit as exc:  # (the recipe's argument errors)
                sec = {"status": "error", "error": f"SystemExit({exc.code})\n{traceback.format_exc()}"}
        sec["seconds"] = time.perf_counter() - start
        report["sections"][key] = sec
        free_memory(args.device)
    checks = [report["sections"][k] for k in ("correctness", "bf16")]
    report["checks_passed"] = all(c["status"] == "ok" and c.get("passed") for c in checks)
    report["wall_s"] = time.perf_counter() - t0
    text = markdown(report)
    (args.out / "gpu.md").write_text(text)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    print(text, flush=True)
    return 0 if report["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
