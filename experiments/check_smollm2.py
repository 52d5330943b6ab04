r"""Sanity check: SmolLM2-135M-Instruct (dequantised Q4_1 GGUF) in the Flax Llama.

Prints perplexity on a short English paragraph and greedy-decodes 8 tokens
after "The capital of France is".

Measured output (CPU, float32, times include jit compilation):
  load time 6.6s
  perplexity on 69-token paragraph: 6.35 (3.2s)
  prompt ids [504, 3575, 282, 4649, 314] -> new ids [7042, 30, 198, 198, 504, 2988, 314, 42] (5.5s)
  greedy: 'The capital of France is' + ' Paris.\n\nThe answer is:'
Same paragraph: scan_layers=True 6.35, bfloat16 compute 6.31; without undoing
llama.cpp's Q/K row permutation it is 21.7 (so the un-permutation matters).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models.llama import Llama
from dora_jax.models.smollm2 import find_gguf, load_smollm2

PARAGRAPH = (
    "The city of Paris is the capital and largest city of France. It is located on the "
    "river Seine, in the north of the country. Paris is known for its museums, its "
    "architecture and its food. Millions of tourists visit the city every year to see "
    "the Eiffel Tower, the Louvre and the cathedral of Notre-Dame."
)
PROMPT = "The capital of France is"


def perplexity(model, params, ids):
    """exp(mean next-token negative log-likelihood) of a single sequence."""
    ids = jnp.asarray(ids)[None]
    logits = jax.jit(model.apply)(params, ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
    return float(jnp.exp(nll.mean()))


def greedy(model, params, ids, n_new: int, pad_to: int = 64):
    """Greedy decoding without a KV cache.

    The sequence is padded to a fixed length so one compiled forward serves all
    steps; causal masking means trailing padding cannot affect earlier logits.
    """
    fwd = jax.jit(model.apply)
    buf = np.zeros((1, max(pad_to, len(ids) + n_new)), dtype=np.int32)
    buf[0, : len(ids)] = ids
    n = len(ids)
    for _ in range(n_new):
        logits = fwd(params, jnp.asarray(buf))
        buf[0, n] = int(jnp.argmax(logits[0, n - 1]))
        n += 1
    return buf[0, len(ids) : n].tolist()


def main():
    t0 = time.perf_counter()
    config, params, tok = load_smollm2(find_gguf())
    print(f"loaded {config}\nload time {time.perf_counter() - t0:.1f}s")
    model = Llama(config)

    ids = tok.encode(PARAGRAPH).ids
    assert tok.decode(ids) == PARAGRAPH, "tokenizer round-trip failed"
    t0 = time.perf_counter()
    ppl = perplexity(model, params, ids)
    dt = time.perf_counter() - t0
    print(f"perplexity on {len(ids)}-token paragraph: {ppl:.2f} ({dt:.1f}s)")

    prompt_ids = tok.encode(PROMPT).ids
    t0 = time.perf_counter()
    new = greedy(model, params, prompt_ids, 8)
    print(f"prompt ids {prompt_ids} -> new ids {new} ({time.perf_counter() - t0:.1f}s)")
    print(f"greedy: {PROMPT!r} + {tok.decode(new)!r}")


if __name__ == "__main__":
    main()
