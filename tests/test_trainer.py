"""transformers' ``Trainer`` with the two lines, as its example scripts use it (``tests/trainer_tasks.py``).

The reference is the unmodified script with the plain Trainer: ``method="bp"`` must give its per-step losses,
gradient norms (``max_grad_norm`` clipping over every module), learning rates, ``eval_loss`` and metrics, and
every trained weight; ``method="fr"`` must train every parameter plain training trains.  Models come from
``from_pretrained`` of local directories with their configs' defaults (``use_cache=True``, dropout on), the data
from ``load_dataset`` on local text and csv files, as ``run_clm.py`` and ``run_classification.py`` load them.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_tasks  # noqa: E402

from replay_opt import ReplayModelWrapper, ReplayOptimizer  # noqa: E402

# Gradient accumulation, clipping that bites (norms ~1), a checkpoint at step 3, dropout on (GPT-2's and BERT's
# defaults: one process per module must draw one process's masks; FR replays them).
SCRIPT = dict(accumulation=2, max_grad_norm=0.5, save_steps=3)
SETTINGS = {"gpt2": SCRIPT, "llama": SCRIPT, "bert": SCRIPT}


@pytest.fixture(scope="module")
def runs(hf_files, tmp_path_factory):
    """Runs of the script by their settings, each done once per module."""
    done: dict = {}

    def get(model, **kwargs):
        key = (model, *sorted(kwargs.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("run")
            done[key] = {**trainer_tasks.train(hf_files, str(out), model=model, **SETTINGS[model], **kwargs),
                         "out": str(out)}  # fmt: skip
        return done[key]

    return get


def initial(hf_files: str, model: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load(str(Path(hf_files) / model), model).state_dict().items()}


def load(directory: str, model: str) -> torch.nn.Module:
    auto = transformers.AutoModelForSequenceClassification if model == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(directory)


def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=0, atol=atol)  # fmt: skip


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_reloads(run: dict, model: str) -> None:
    """``save_model``'s directory loads with ``from_pretrained`` to exactly the trained weights."""
    assert_same_weights(dict(load(run["out"], model).state_dict()), run["state"], atol=0)


def assert_trains_what_plain_trains(hf_files: str, model: str, plain: dict, run: dict) -> None:
    start = initial(hf_files, model)
    trained = {k for k in start if not torch.equal(start[k], plain["state"][k])}
    assert trained and trained == {k for k in start if not torch.equal(start[k], run["state"][k])}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama", "bert"])
def test_bp_equals_the_plain_trainer(runs, model):
    """GPT-2 with tied embeddings and a Llama-style decoder with rotary embeddings, both with ``use_cache=True``;
    a BERT classifier with dropout."""
    plain, bp = runs(model), runs(model, method="bp")
    assert bp["label_names"] == plain["label_names"] == ["labels"]  # found from the wrapper's forward signature
    assert len(bp["losses"]) == 6 and len(bp["evals"]) == 3
    for key in ("losses", "grad_norms", "learning_rates", "evals"):
        assert_close(bp[key], plain[key])
    assert max(plain["grad_norms"]) > SCRIPT["max_grad_norm"]  # clipping happened
    assert_close(bp["metrics"]["eval_loss"], plain["metrics"]["eval_loss"])
    assert_close(bp["metrics"]["eval_accuracy"], plain["metrics"]["eval_accuracy"])
    assert_same_weights(bp["state"], plain["state"])
    assert_reloads(bp, model)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_fr_trains_every_parameter_plain_training_trains(runs, hf_files, model):
    """The BERT classifier (dropout on) runs in bf16 (``TrainingArguments(bf16=True)``): Accelerate's autocast must
    reach the captured modules' linear layers (attention's batched products are left out: on CPU they may compute
    in fp32 inside)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    seen: set[torch.dtype] = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in products and not isinstance(out, FakeTensor):  # (not the capture's tracing)
                seen.add(out.dtype)
            return out

    bf16 = model == "bert"
    plain = runs(model)
    with Dtypes() if bf16 else contextlib.nullcontext():
        fr = runs(model, method="fr", bf16=bf16)
    assert seen == ({torch.bfloat16} if bf16 else set())
    assert_trains_what_plain_trains(hf_files, model, plain, fr)
    assert fr["losses"][:2] == pytest.approx(plain["losses"][:2], abs=0 if not bf16 else 0.05)  # step 1 is BP's
    assert all(torch.isfinite(torch.tensor(fr[k])).all() for k in ("losses", "grad_norms", "evals"))
    assert abs(fr["metrics"]["eval_loss"] - plain["metrics"]["eval_loss"]) < 0.05
    assert_reloads(fr, model)


@pytest.mark.slow
def test_resume_from_checkpoint_equals_an_uninterrupted_run(runs, hf_files, tmp_path):
    whole = runs("gpt2", method="fr")
    resumed = trainer_tasks.train(hf_files, str(tmp_path), model="gpt2", method="fr",
                                  resume=str(Path(whole["out"]) / "checkpoint-3"), **SETTINGS["gpt2"])  # fmt: skip
    assert_close(resumed["losses"], whole["losses"])  # steps 1-3 from the checkpoint's log, 4-6 trained again
    assert_close(resumed["evals"], whole["evals"])
    assert_same_weights(resumed["state"], whole["state"], atol=0)


@pytest.mark.slow
def test_one_process_per_module_equals_one_process(cpu_cluster, runs, hf_files, tmp_path):
    """``accelerate launch --num_processes 2`` running the Trainer script: rank 0 (the last module) logs the real
    losses and metrics; checkpoints, ``save_model`` and ``resume_from_checkpoint`` work from every rank."""
    for method in ("bp", "fr"):
        one = runs("gpt2", method=method)
        out = tmp_path / method
        ranks = cpu_cluster.run("trainer_tasks:train", root=hf_files, out=str(out), model="gpt2", method=method,
                                **SETTINGS["gpt2"])  # fmt: skip
        for key in ("losses", "grad_norms", "learning_rates", "evals"):
            assert_close(ranks[0][key], one[key])
        assert_close(ranks[0]["metrics"]["eval_loss"], one["metrics"]["eval_loss"])
        for rank in ranks:  # every rank's state dict holds every module's trained weights
            assert_same_weights(rank["state"], one["state"])
        assert_reloads({"out": str(out), "state": ranks[0]["state"]}, "gpt2")
    checkpoint = str(tmp_path / "fr" / "checkpoint-3")
    resumed = cpu_cluster.run("trainer_tasks:train", root=hf_files, out=str(tmp_path / "resumed"), model="gpt2",
                              method="fr", resume=checkpoint, **SETTINGS["gpt2"])  # fmt: skip
    assert_close(resumed[0]["losses"], one["losses"])
    assert_same_weights(resumed[1]["state"], one["state"])
    for message in cpu_cluster.run("trainer_tasks:generate_in_a_pipeline", root=hf_files):
        assert "generate() needs the whole model in one process" in message and "from_pretrained" in message


def test_the_wrapper_shows_trainer_what_it_inspects_on_the_model(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    wrapper = ReplayModelWrapper(model, num_modules=2)
    assert inspect.signature(wrapper.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(type(wrapper).forward).parameters  # Trainer's find_labels reads the class
    assert isinstance(wrapper, ReplayModelWrapper) and type(wrapper).__name__ == "ReplayModelWrapper[GPT2LMHeadModel]"
    for name in ("config", "name_or_path", "main_input_name", "generation_config", "_keys_to_ignore_on_save"):
        assert getattr(wrapper, name) is getattr(model, name), name
    assert wrapper.can_generate() and wrapper.config.use_cache  # the config is left as it was
    assert not hasattr(wrapper, "hf_device_map")  # every module on one device: no device map, as for the model
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(wrapper.generate(prompt, max_new_tokens=3, do_sample=False),
                       model.generate(prompt, max_new_tokens=3, do_sample=False))  # fmt: skip
    with pytest.raises(AttributeError, match="no_such_attribute"):
        wrapper.no_such_attribute  # noqa: B018
    trainer = transformers.Trainer(
        model=wrapper,
        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                            activation_checkpointing=True),
        train_dataset=[{"input_ids": torch.arange(8), "labels": torch.arange(8)}],
        optimizers=(ReplayOptimizer(torch.optim.AdamW(wrapper.parameters()), wrapper), None),
    )  # fmt: skip
    trainer.train()  # activation checkpointing, per pipeline module (tests/test_checkpointing.py)
    assert wrapper.is_gradient_checkpointing
    # Modules spread over two devices of this process (two CPU "devices" here): a device map, which makes Trainer
    # treat the model as model-parallel -- no move to one device, no DataParallel.
    spread = ReplayModelWrapper(transformers.GPT2LMHeadModel(config), num_modules=2, devices=["cpu:0", "cpu:1"])
    assert list(spread.hf_device_map.values()) == ["cpu:0", "cpu:1"]  # one entry per module (its first unit)
    trainer = transformers.Trainer(
        model=spread, args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        optimizers=(ReplayOptimizer(torch.optim.AdamW(spread.parameters()), spread), None),
    )  # fmt: skip
    assert trainer.is_model_parallel and not trainer.place_model_on_device


# --------------------------------------------------------------------------- the Accelerate-loop scripts


@pytest.mark.slow
def test_accelerate_loop_script_with_bp_equals_the_unmodified_script(hf_files, tmp_path):
    """``run_glue_no_trainer.py`` with the two lines (BERT, dropout on): the unmodified script's losses, accuracy
    and saved weights with ``bp``; ``fr`` trains every parameter; the saved directories reload exactly.
    (``run_clm_no_trainer.py``: below, with one process per module.)"""
    model = "bert"
    plain, bp, fr = (trainer_tasks.train_no_trainer(hf_files, str(tmp_path / str(m)), model=model, method=m)
                     for m in (None, "bp", "fr"))  # fmt: skip
    assert len(bp["losses"]) == 12  # 6 optimizer steps of 2 accumulated batches
    assert_close(bp["losses"], plain["losses"])
    for key in plain["metrics"]:
        assert_close(bp["metrics"][key], plain["metrics"][key])
    assert_same_weights(bp["state"], plain["state"])
    assert_trains_what_plain_trains(hf_files, model, plain, fr)
    for m, run in (("bp", bp), ("fr", fr)):
        assert_reloads({"out": str(tmp_path / m), "state": run["state"]}, model)


@pytest.mark.slow
def test_accelerate_loop_script_one_process_per_module_and_resume(cpu_cluster, hf_files, tmp_path):
    """``run_clm_no_trainer.py`` with ``fr`` under ``accelerate launch --num_processes 2``: one process's losses,
    metrics and weights; ``save_state`` / ``load_state`` resume it exactly (dropout off: the unmodified script
    itself does not resume exactly with dropout; dropout with one process per module in an Accelerate loop:
    tests/test_finetune.py)."""
    settings = dict(model="gpt2", method="fr", dropout=False, checkpoint_steps=3)
    one = trainer_tasks.train_no_trainer(hf_files, str(tmp_path / "one"), **settings)
    ranks = cpu_cluster.run("trainer_tasks:train_no_trainer", root=hf_files, out=str(tmp_path / "two"), **settings)
    assert_close(ranks[0]["losses"], one["losses"])
    assert_close(ranks[0]["metrics"]["perplexity"], one["metrics"]["perplexity"])
    for rank in ranks:
        assert_same_weights(rank["state"], one["state"])
    resumed = cpu_cluster.run("trainer_tasks:train_no_trainer", root=hf_files, out=str(tmp_path / "resumed"),
                              resume=str(tmp_path / "two" / "step_3"), **settings)  # fmt: skip
    assert_close(resumed[0]["losses"], one["losses"][6:])
    assert_same_weights(resumed[1]["state"], one["state"])
    assert_reloads({"out": str(tmp_path / "resumed"), "state": resumed[0]["state"]}, "gpt2")
