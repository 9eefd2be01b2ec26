"""PEFT (LoRA) and TRL's ``SFTTrainer`` with the two lines (``tests/finetune_tasks.py``).

The references are the unmodified scripts: ``method="bp"`` must give their losses and weights (adapters and
all), ``method="fr"`` must train with Features Replay -- never plain backprop in disguise: with K=2, module 1
has no gradient in the first step, so after one step the adapters of module 1 are exactly as initialised while
module 2's moved, which no backprop run can show.  Saved adapters reload with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_tasks

from replay_opt import ReplayModelWrapper

MODULE_1 = "layers.0."  # with K=2 and balance by parameters, the tiny Llama's first block is in module 1


@pytest.fixture(scope="module")
def runs(hf_files, tmp_path_factory):
    """Runs of a task by its settings, each done once per module."""
    done: dict = {}

    def get(task, **kwargs):
        key = (task, *sorted(kwargs.items()))
        if key not in done:
            out = tmp_path_factory.mktemp(task)
            done[key] = {**getattr(finetune_tasks, task)(hf_files, str(out), **kwargs), "out": str(out)}
        return done[key]

    return get


def assert_close(a, b, atol=1e-5):
    assert torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=atol), (
        a, b)  # fmt: skip


def assert_same(a: dict, b: dict, atol: float = 1e-5, only: str = "") -> None:
    assert a.keys() == b.keys()
    for k in a:
        if only in k:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k] - b[k]).abs().max())


def adapters(state: dict) -> dict:
    return {k: v for k, v in state.items() if "lora_" in k}


def assert_trained_by_fr(initial: dict, fr: dict, plain: dict) -> None:
    """FR trained the adapters only, all of them, differently from backprop."""
    for k, v in initial.items():
        if "lora_" not in k:
            assert torch.equal(fr[k], v), f"{k} is frozen but moved"
    moved = [k for k in adapters(initial) if not torch.equal(fr[k], initial[k])]
    assert moved
    assert any(not torch.allclose(fr[k], plain[k], atol=1e-4) for k in moved)


def test_a_wrapped_peft_model_presents_itself_as_one(hf_files):
    """What Trainer, TRL and Accelerate look for on a PEFT model (``integrations/peft.py``)."""
    from accelerate.utils import is_peft_model
    from peft import PeftModel
    from transformers.trainer_utils import _is_peft_model

    model = finetune_tasks.lora(hf_files)
    wrapper = ReplayModelWrapper(model, num_modules=2)
    assert isinstance(wrapper, PeftModel) and is_peft_model(wrapper) and _is_peft_model(wrapper)
    assert isinstance(wrapper, ReplayModelWrapper)
    assert type(wrapper).__name__ == "ReplayModelWrapper[PeftModelForCausalLM]"
    assert wrapper.get_base_model() is model.get_base_model() and wrapper.peft_config is model.peft_config
    parameters = inspect.signature(wrapper.forward).parameters  # the base model's: Trainer keeps these columns
    assert {"input_ids", "attention_mask", "labels", "use_cache"} <= set(parameters)
    assert "ReplayModelWrapper[PeftModelForCausalLM]" in repr(wrapper)


FR = dict(method="fr", save_steps=2)  # the fr Trainer run, with a checkpoint at step 2 to resume from


@pytest.mark.slow
def test_lora_under_trainer(runs, hf_files):
    """``get_peft_model`` + the two lines under ``Trainer``: the dataset's columns kept by the base model's
    signature, bp gives plain's losses and adapter weights, fr moves the adapters only, module 1's not in the first
    step; ``save_model`` writes the adapter, which ``PeftModel.from_pretrained`` reloads to the trained weights."""
    plain, bp, fr = runs("lora_trainer"), runs("lora_trainer", method="bp"), runs("lora_trainer", **FR)
    assert len(bp["losses"]) == 3
    assert_close(bp["losses"], plain["losses"])
    assert_same(bp["weights"], plain["weights"])
    initial = finetune_tasks.lora(hf_files).state_dict()
    assert_trained_by_fr(initial, fr["weights"], plain["weights"])
    assert_first_step_of_fr(initial, fr["first"])
    for run in (bp, fr):
        out = Path(run["out"])
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        assert not (out / "model.safetensors").exists()  # the adapter, not the whole model
        assert_same(finetune_tasks.reload_adapter(hf_files, str(out)), run["weights"], atol=0)


@pytest.mark.slow
def test_lora_trainer_resumes_exactly(runs, tmp_path, hf_files):
    whole = runs("lora_trainer", **FR)
    resumed = finetune_tasks.lora_trainer(hf_files, str(tmp_path), **FR,
                                          resume=str(Path(whole["out"]) / "checkpoint-2"))  # fmt: skip
    assert_close(resumed["losses"][-1:], whole["losses"][2:])  # step 3, trained again from the checkpoint
    assert_same(resumed["weights"], whole["weights"], atol=0)


def assert_first_step_of_fr(initial: dict, first: dict) -> None:
    """The signature of Features Replay that plain backprop cannot show: after one step with K=2, module 1's
    adapters are as initialised (no stale gradient yet) and module 2's moved."""
    module_1 = {k for k in adapters(initial) if MODULE_1 in k}
    assert module_1 and all(torch.equal(first[k], initial[k]) for k in module_1)
    assert any(not torch.equal(first[k], initial[k]) for k in adapters(initial) if k not in module_1)


@pytest.mark.slow
def test_sft_trainer_with_its_defaults(runs, hf_files):
    """``SFTTrainer`` with ``SFTConfig``'s defaults (gradient checkpointing on, the fused LM head -- patched onto
    the base model under PEFT --, its metrics) on a LoRA model: bp gives plain's losses, metrics and weights; fr
    trains with Features Replay; the saved adapter reloads.  (TRL's head patched onto the wrapper itself, a full
    model: tests/test_bypass.py, against TRL's kernel, and docs/finetuning.md's example.)"""
    plain, bp, fr = (runs("sft", method=m, peft=True) for m in (None, "bp", "fr"))
    assert bp["checkpointing"] and fr["checkpointing"]
    for key in ("losses", "accuracy", "entropy"):
        assert_close(bp[key], plain[key])
    assert_same(bp["weights"], plain["weights"])
    initial = finetune_tasks.lora(hf_files).state_dict()
    assert_trained_by_fr(initial, fr["weights"], plain["weights"])
    assert_first_step_of_fr(initial, fr["first"])
    assert_same(finetune_tasks.reload_adapter(hf_files, bp["out"]), bp["weights"], atol=0)


@pytest.mark.slow
def test_dpo_trainer(runs):
    """TRL's ``DPOTrainer`` (the same fused head as SFTTrainer's, patched onto the base model; the reference
    log-probabilities from the model with its adapters off, under ``torch.no_grad()``): bp is plain.  (fr runs the
    head as for SFTTrainer, above.)"""
    plain, bp = (runs("dpo", method=m) for m in (None, "bp"))
    assert_close(bp["losses"], plain["losses"])
    assert_same(bp["weights"], plain["weights"])


@pytest.mark.slow
def test_lora_in_an_accelerate_loop(runs, hf_files):
    """``out = model(input_ids=..., labels=...)`` on a wrapped LoRA model: ``use_cache=False`` reaches the base
    model through PEFT's ``**kwargs``; bp is plain; the adapter saved by ``unwrap_model(...).save_pretrained``
    reloads."""
    plain, bp, fr = (runs("lora_loop", method=m) for m in (None, "bp", "fr"))
    assert_close(bp["losses"], plain["losses"])
    assert_same(bp["weights"], plain["weights"])
    assert_trained_by_fr(finetune_tasks.lora(hf_files).state_dict(), fr["weights"], plain["weights"])
    assert_same(finetune_tasks.reload_adapter(hf_files, fr["out"]), fr["weights"], atol=0)


@pytest.mark.slow
def test_one_process_per_module(cpu_cluster, runs, hf_files, tmp_path):
    """The same scripts under ``accelerate launch --num_processes 2`` (LoRA dropout on): one process's losses and
    weights, on every rank -- SFTTrainer with bp and fr, Trainer and the Accelerate loop with fr; the adapter saved
    from the main process reloads; a checkpoint written by two processes resumes exactly in two."""
    cases = [("lora_trainer", FR), ("sft", {"method": "bp", "peft": True}), ("sft", {"method": "fr", "peft": True}),
             ("lora_loop", {"method": "fr"})]  # fmt: skip
    for task, settings in cases:
        one = runs(task, **settings)
        out = tmp_path / f"{task}-{settings['method']}"
        ranks = cpu_cluster.run(f"finetune_tasks:{task}", root=hf_files, out=str(out), **settings)
        assert_close(ranks[0]["losses"], one["losses"])
        for rank in ranks:
            assert_same(rank["weights"], one["weights"])
        assert_same(finetune_tasks.reload_adapter(hf_files, str(out)), one["weights"], only="lora_")
    whole = runs("lora_trainer", **FR)
    resumed = cpu_cluster.run("finetune_tasks:lora_trainer", root=hf_files, out=str(tmp_path / "resumed"), **FR,
                              resume=str(tmp_path / "lora_trainer-fr" / "checkpoint-2"))  # fmt: skip
    assert_close(resumed[0]["losses"][-1:], whole["losses"][2:])
    for rank in resumed:
        assert_same(rank["weights"], whole["weights"])
