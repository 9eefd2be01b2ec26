"""bench/gpu.py, the prepared GPU run, as a quick smoke run on the CPU: every section runs and reports figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("correctness", "bf16", "step_time", "memory", "microbatch", "lm_recipe")


@pytest.mark.slow  # (about 20 s: every section at toy sizes, in this process)
def test_quick_cpu_run_writes_every_section(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    import bench.gpu

    out = tmp_path / "gpu"
    monkeypatch.chdir(ROOT)  # (as `python -m bench.gpu` from the repository root; it runs the LM recipe)
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        assert bench.gpu.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    report = json.loads((out / "gpu.json").read_text())
    text = (out / "gpu.md").read_text()
    assert report["environment"]["device_name"] == "cpu" and report["environment"]["torch"]
    assert report["checks_passed"] and "Correctness checks: **PASS**" in text
    for key in SECTIONS:
        section = report["sections"][key]
        assert section["status"] == "ok", section.get("error") or section.get("reason")
        assert section["rows"], key
    correctness = report["sections"]["correctness"]
    assert correctness["passed"] and all(r["max_abs_diff"] <= 1e-5 for r in correctness["rows"])
    assert {r["check"] for r in correctness["rows"]} == {"bp == plain autograd", "fr == naive Algorithm 1"}
    assert all(r["finite"] for r in report["sections"]["bf16"]["rows"])
    step = report["sections"]["step_time"]["rows"]
    assert {r["config"] for r in step} >= {"plain (no wrapper)", "bp K=2", "fr K=2", "ddg K=2"}
    assert all(r["step_s"] > 0 and r["ratio_to_plain"] > 0 for r in step)
    memory = report["sections"]["memory"]["rows"]
    assert {r["method"] for r in memory} == {"plain", "bp", "fr", "ddg", "dni", "dgl"}
    assert all(r["held_ratio_to_bp"] > 0 for r in memory if r["method"] != "plain")
    assert all(r["per_sample_s"] > 0 for r in report["sections"]["microbatch"]["rows"])
    assert report["sections"]["lm_recipe"]["rows"][0]["steps_per_s"] > 0
    for title in ("CUDA correctness", "bf16 autocast", "Step time", "Peak memory", "Micro-batch", "LM recipe"):
        assert title in text
