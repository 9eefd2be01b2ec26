"""bench/gpu.py, the prepared GPU run, as a quick smoke run on the CPU: every section runs and reports figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("correctness", "bf16", "step_time", "memory", "microbatch", "lm_recipe")


@pytest.mark.slow  # (about 30 s: one subprocess running every section at toy sizes)
def test_quick_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
