"""benchmarks/gpu.py, the one-GPU LoRA-vs-DoRA script, runs end to end on the CPU (``--quick``).

No GPU is needed or used: this checks that the script a GPU machine would run completes,
writes its JSON and Markdown, and measures the same architecture on both frameworks.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_script_quick_run_writes_both_frameworks_rows(tmp_path):
    out = str(tmp_path / "gpu")
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--quick",
        "--models", "bench", "--frameworks", "jax,torch", "--layouts", "scanned",
        "--methods", "lora,dora,vera,dvora", "--out", out,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    with open(out + ".json") as fh:
        result = json.load(fh)
    assert result["meta"]["errors"] == []
    assert "WARNING: no GPU found" in proc.stderr
    assert "note: PEFT has no dvora" in proc.stdout
    rows = {(r["framework"], r["method"]): r for r in result["rows"]}
    methods = ("lora", "dora", "vera", "dvora")
    # DVoRA has no PEFT counterpart: no PEFT row stands in for it.
    assert set(rows) == {("dora_jax", m) for m in methods} | {
        ("PEFT", m) for m in methods if m != "dvora"
    }
    for row in rows.values():
        assert row["device"] == "cpu"
        assert row["step_s"] > 0 and math.isfinite(row["loss"])
        assert row["mfu"] is None  # no known peak for a CPU: no figure is made up
        assert row["peak_flops"] is None and "no MFU" in row["peak_flops_source"]
    for method in ("lora", "dora", "vera"):
        jax_row, peft_row = rows["dora_jax", method], rows["PEFT", method]
        assert jax_row["layout"] == "scanned" and jax_row["xla_step_mb"] > 0
        # Both frameworks build the same architecture.
        assert jax_row["n_params"] == peft_row["n_params"]
        assert jax_row["time_vs_peft"] == pytest.approx(jax_row["step_s"] / peft_row["step_s"])
    dora, lora = rows["dora_jax", "dora"], rows["dora_jax", "lora"]
    assert dora["memory_vs_lora"] == pytest.approx(dora["xla_step_mb"] / lora["xla_step_mb"])
    assert dora["time_vs_lora"] == pytest.approx(dora["step_s"] / lora["step_s"])

    with open(out + ".md") as fh:
        table = fh.read()
    assert "| framework | model | layout | method |" in table
    assert table.count("| dora_jax | bench | scanned |") == 4
    assert "dora_jax ran on cpu" in table and "No GPU: these are CPU figures" in table
