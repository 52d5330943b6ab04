"""Step time of a Gemma-style block, LoRA vs DoRA, with kernels in Gemma's layout vs (in, out).

The same block (q, kv, attn_vec, gating and down projections written as Gemma's einsums) is
timed twice: with Gemma's kernel layouts (``q (N, D, H)``, ``kv (2, K, D, H)``,
``gating (2, F, D)``: input axes not first) and with the same kernels stored input-first.
A layout should cost nothing: the two columns should agree. One process, interleaved
rounds, medians; a training step is forward, backward and AdamW on the adapter leaves.

    taskset -c 1 python benchmarks/layout_overhead.py --rounds 7
    python benchmarks/layout_overhead.py --rounds 1 --tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import at_least

import dora_jax

D, N, H, F, K = 512, 8, 64, 1408, 4

# name: (equation, kernel shape) in Gemma's layout and input-first.
LAYOUTS = {
    "gemma": {
        "q": ("BTD,NDH->BTNH", (N, D, H)),
        "kv": ("BSD,CKDH->CBSKH", (2, K, D, H)),
        "o": ("BTNH,NHD->BTD", (N, H, D)),
        "gate": ("...D,CFD->...CF", (2, F, D)),
        "down": ("BTF,FD->BTD", (F, D)),
    },
    "input_first": {
        "q": ("BTD,DNH->BTNH", (D, N, H)),
        "kv": ("BSD,DCKH->CBSKH", (D, 2, K, H)),
        "o": ("BTNH,NHD->BTD", (N, H, D)),
        "gate": ("...D,DCF->...CF", (D, 2, F)),
        "down": ("BTF,FD->BTD", (F, D)),
    },
}


def make(layout: str):
    eqs = {k: eq for k, (eq, _) in LAYOUTS[layout].items()}
    keys = jax.random.split(jax.random.key(0), len(eqs))
    params = {
        k: 0.02 * jax.random.normal(key, shape)
        for key, (k, (_, shape)) in zip(keys, LAYOUTS[layout].items())
    }

    def block(p, x):
        q = jnp.einsum(eqs["q"], x, p["q"])
        kv = jnp.einsum(eqs["kv"], x, p["kv"])
        v = jnp.repeat(kv[1], N // K, axis=2)
        h = x + jnp.einsum(eqs["o"], jnp.tanh(q) * v, p["o"])
        g = jnp.einsum(eqs["gate"], h, p["gate"])
        return h + jnp.einsum(eqs["down"], jax.nn.gelu(g[..., 0, :]) * g[..., 1, :], p["down"])

    return params, block


def step_fn(params, block, x, method: str, axes):
    adapted = dora_jax.wrap(params, rank=8, method=method, axes=axes, targets=list(params))
    frozen, trainable = dora_jax.partition(adapted)
    tx = optax.adamw(1e-3)
    forward = dora_jax.apply(block, strict=True)

    @jax.jit
    def step(trainable, opt_state):
        def loss(t):
            return jnp.mean(forward(dora_jax.combine(frozen, t), x) ** 2)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    state = (trainable, tx.init(trainable))
    jax.block_until_ready(step(*state))
    return step, state


def tokens(text: str) -> int:
    """An argparse ``type``: tokens per batch, a positive multiple of the batch of 8."""
    n = at_least(8)(text)
    if n % 8:
        raise argparse.ArgumentTypeError(f"a multiple of 8 (8 sequences per batch), got {n}")
    return n


tokens.__name__ = "multiple of 8"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=at_least(1), default=7)
    p.add_argument(
        "--tokens", type=tokens, default=1024,
        help="batch x sequence: 8 sequences of tokens/8 each, so a multiple of 8",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="write the medians and ratios here")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    x = jax.random.normal(jax.random.key(1), (8, args.tokens // 8, D))
    runs = {}
    for layout in LAYOUTS:
        params, block = make(layout)
        axes = dora_jax.infer_axes(block, params, x)
        for method in ("lora", "dora"):
            runs[layout, method] = step_fn(params, block, x, method, axes)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (step, state) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*state))
            times[k].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print("| layout | LoRA step s | DoRA step s | DoRA/LoRA |")
    print("|---|---|---|---|")
    results = {}
    for layout in LAYOUTS:
        lora, dora = med[layout, "lora"], med[layout, "dora"]
        results[layout] = {"lora_step_s": lora, "dora_step_s": dora, "dora_vs_lora": dora / lora}
        print(f"| {layout} | {lora:.3f} | {dora:.3f} | {dora / lora:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
