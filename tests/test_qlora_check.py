"""benchmarks/qlora_check.py runs its steps on the CPU (unquantized, toy sizes) and records what it checks; the 4-bit
run itself needs a CUDA GPU and bitsandbytes (docs/qlora.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_check.py"


def test_qlora_check_smoke_run_on_the_cpu(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--no-4bit", "--layers", "1", "--hidden",
                           "64", "--vocab", "128", "--batch", "2", "--seq", "16", "--steps", "3", "--compile-checks",
                           "refused", "--child-features", "32", "--child-tokens", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["hydralora"]["checks"]
    assert result["hydralora"]["finite"] and result["lora"]["finite"]
    assert checks["reload_max_abs_logit_diff"] == 0.0
    assert checks["generate"]["token_routing_equals_trained_model"]
    assert checks["routing"]["sequence"]["spread_over_tokens"] == 0.0 < checks["routing"]["token"]["spread_over_tokens"]
    assert checks["export"]["peft_type"] == "LORA" and checks["export"]["max_abs_logit_diff_vs_fixed_mean"] < 1e-4
    assert checks["merge"]["refused"] is False  # unquantized: merged; on the 4-bit base it is refused
    refused = result["compile"]["refused"]
    assert refused["returncode"] == 0 and not refused["ok"] and "reduce-overhead" in refused["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA")
def test_qlora_check_without_cuda_says_why(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert "CUDA" in json.loads(out.read_text())["error"]
