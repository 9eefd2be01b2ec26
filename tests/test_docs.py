"""Every code block in README.md and docs/ runs as written.

* ```python blocks run, each in a fresh namespace holding the placeholders a reader fills in
  (``build_my_model``, ``loader``, a ``model``, an ``accelerator`` ...), on CPU, from the repository
  root;
* every command of a ```bash block is checked: the recipe's commands are parsed by the recipe's
  own parser and their model and cut are built; ``python -m bench.X`` and ``python -m
  replay_opt.plan`` commands are parsed by the module's parser; ``pip install``, ``pytest``,
  ``wandb sync`` and ``accelerate config`` are environment commands. A command of any other kind
  fails the test until it is taught here, so no documented command goes unchecked.
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SLOW_DOCS = {"trainer.md", "finetuning.md"}  # python blocks that train through Trainer or TRL: in the slow set
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                line = text[: m.start()].count("\n") + 1
                marks = [pytest.mark.slow] if doc.name in SLOW_DOCS and language == "python" else []
                found.append(pytest.param(m.group(2), id=f"{doc.relative_to(ROOT)}:{line}", marks=marks))
    return found


@pytest.fixture
def fresh_accelerate(monkeypatch):
    monkeypatch.chdir(ROOT)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def placeholders() -> dict:
    """What the reader brings: a model, its data, an Accelerator -- small, on CPU."""
    from accelerate import Accelerator

    def build_my_model():
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = [torch.nn.Linear(8, 16), torch.nn.Tanh()]
        for _ in range(3):
            layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(16, 4))

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)),
                        batch_size=16)  # fmt: skip
    return {"torch": torch, "F": F, "build_my_model": build_my_model, "model": build_my_model(), "loader": loader,
            "accelerator": Accelerator(cpu=True)}  # fmt: skip


@pytest.mark.parametrize("code", blocks("python"))
def test_python_blocks_run(code, fresh_accelerate):
    namespace = placeholders()
    namespace["__name__"] = "__docs__"
    exec(compile(code, "<docs>", "exec"), namespace)


# --------------------------------------------------------------------------- commands


def commands(script: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, continuations joined, `&&` and `;` split,
    `for V in a b ...` loops unrolled to their first value."""
    script = re.sub(r"\\\n\s*", " ", script)
    loops = dict(re.findall(r"for (\w+) in ([^;]+);", script))
    out = []
    for line in script.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for name, values in loops.items():
            line = line.replace(f"${name}", values.split()[0])
        for part in re.split(r"&&|;", line):
            words = shlex.split(part.strip())
            while words and (re.fullmatch(r"\w+=.*", words[0]) or words[0] in ("do", "done", "then")):
                words = words[1:]  # VAR=value prefixes, loop keywords
            if words and words[0] not in ("for", "done"):
                out.append(words)
    return out


def check_recipe(path: str, args: list[str]) -> None:
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    parsed = module.parse_args(args)
    if getattr(parsed, "dataset", None) == "digits":  # meant for this machine: it must say how long it runs
        assert "--model" in args and ("--epochs" in args or "--max-steps" in args), (
            f"a command on the bundled data must name its model and its length (--epochs / --max-steps): {args}"
        )
    if path.endswith("resnet_cifar.py"):
        from recipes.models import build_model
        from replay_opt import ReplayModelWrapper

        if parsed.model.startswith("torchvision:"):
            pytest.importorskip("torchvision")
        model = build_model(parsed.model, 10)
        example = (torch.randn(2, 3, 32, 32),) if parsed.balance == "time" else None
        ReplayModelWrapper(model, num_modules=parsed.modules if parsed.split_points is None else None,
                           method=parsed.method, split_points=parsed.split_points, balance=parsed.balance,
                           example_inputs=example)  # fmt: skip


def check(words: list[str]) -> None:
    program, rest = words[0], words[1:]
    if program == "pip" or program == "pytest" or words[:2] in (["wandb", "sync"], ["accelerate", "config"]):
        return  # the environment's own commands
    if program in ("accelerate", "torchrun", "python"):
        if program == "accelerate":
            assert rest[0] == "launch", words
        if "-m" in rest and rest.index("-m") < len(rest) - 1 and not any(w.endswith(".py") for w in rest):
            module = rest[rest.index("-m") + 1]
            args = rest[rest.index("-m") + 2 :]
            assert module.startswith(("bench.", "replay_opt.")), f"teach tests/test_docs.py about: {words}"
            importlib.import_module(module).parser().parse_args(args)
            return
        script = next((w for w in rest if w.endswith(".py")), None)
        if script is None:  # a launcher fragment ("accelerate launch --num_processes K"): nothing to run
            assert program == "accelerate" or program == "torchrun", words
            return
        assert (ROOT / script).exists(), script
        if script.startswith("recipes/"):
            check_recipe(script, rest[rest.index(script) + 1 :])
        return
    raise AssertionError(f"teach tests/test_docs.py how to check this documented command: {' '.join(words)}")


@pytest.mark.parametrize("script", blocks("bash"))
def test_commands_are_valid(script, fresh_accelerate, capsys):
    sys.path.insert(0, str(ROOT))
    for words in commands(script):
        try:
            check(words)
        except SystemExit as exc:  # --help, or the parser refusing the command
            assert exc.code == 0 and "--help" in words, (words, capsys.readouterr().err[-2000:])


def inline_commands() -> list:
    """Commands quoted inline (`python -m bench.step ...`), outside fenced blocks."""
    found = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        for m in re.finditer(r"`((?:ACCELERATE_USE_CPU=1 )?(?:python|accelerate launch|torchrun)\s[^`]+)`", text):
            found.append(pytest.param(m.group(1), id=f"{doc.relative_to(ROOT)}:{m.group(1)[:40]}"))
    return found


@pytest.mark.parametrize("command", inline_commands())
def test_inline_commands_are_valid(command, fresh_accelerate, capsys):
    sys.path.insert(0, str(ROOT))
    for words in commands(command.replace("\n", " ")):
        if words[-1] in ("...", "…"):  # an elided example ("... --modules 2 ..."): the part shown is checked
            words = words[:-1]
        try:
            check(words)
        except SystemExit as exc:
            assert exc.code == 0 and "--help" in words, (words, capsys.readouterr().err[-2000:])
