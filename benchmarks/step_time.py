"""Training-step time and memory of LoRA, DoRA and full fine-tuning on a small Llama.

One process times every method (interleaved rounds, so machine noise hits all alike) and
prints ratios to LoRA; peak memory comes from a separate process per method, plus XLA's
own buffer accounting of the compiled step. Not a test: the numbers are for reading.

    python benchmarks/step_time.py                # default: hidden 512, FFN 1408, 4 layers
    python benchmarks/step_time.py --json out.json --rounds 7

Methods: ``full`` (all weights), ``lora``, ``dora`` (dora_jax.apply, factored forward),
``dora_merge`` (W' formed inside the loss with dora_jax.merge: what a naive port does),
``dora_exact`` (factored, exact norm gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import dora_jax
from dora_jax.memory import PeakRSS
from dora_jax.models.llama import Llama, LlamaConfig, next_token_loss, projection_regex

METHODS = ("full", "lora", "dora", "dora_merge", "dora_exact")
PROJECTIONS = projection_regex()


def cross_entropy(logits, tokens):
    return next_token_loss(logits, tokens)


def make_step(method: str, model, params, rank: int, dropout: float, lr: float = 1e-4):
    """Returns (jitted step, initial state, frozen params, trainable parameter count)."""
    tx = optax.adamw(lr)
    if method == "full":

        def loss_full(p, tokens, key):  # noqa: ARG001
            return cross_entropy(model.apply({"params": p}, tokens), tokens)

        params = jax.tree.map(jnp.copy, params)  # donated below; keep the caller's
        state = (params, tx.init(params))

        def step(state, frozen, tokens, key):
            p, opt = state
            loss, g = jax.value_and_grad(loss_full)(p, tokens, key)
            del frozen
            updates, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, updates), opt), loss

        n = sum(x.size for x in jax.tree.leaves(params))
        return jax.jit(step, donate_argnums=0), state, None, n

    kind = "lora" if method == "lora" else "dora"
    adapted = dora_jax.wrap(
        params,
        rank=rank,
        method=kind,
        targets=PROJECTIONS,
        dropout=dropout,
        exact_norm_grad=method == "dora_exact",
    )
    frozen, trainable = dora_jax.partition(adapted)

    def loss_adapted(t, frozen, tokens, key):
        p = dora_jax.combine(frozen, t)
        if method == "dora_merge":
            logits = model.apply({"params": dora_jax.merge(p)}, tokens)
        else:
            logits = dora_jax.apply(model.apply, key=key if dropout else None)(
                {"params": p}, tokens
            )
        return cross_entropy(logits, tokens)

    state = (trainable, tx.init(trainable))

    # The frozen half is an argument, not a closure: closed-over arrays would be baked into
    # the compiled program as constants.
    def step(state, frozen, tokens, key):
        t, opt = state
        loss, g = jax.value_and_grad(loss_adapted)(t, frozen, tokens, key)
        updates, opt = tx.update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), loss

    n = sum(x.size for x in jax.tree.leaves(trainable))
    return jax.jit(step, donate_argnums=0), state, frozen, n


def setup(args):
    cfg = LlamaConfig.bench()
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    return cfg, model, params, tokens


def memory_of(method: str, args) -> dict:
    """Runs in a fresh process: compile, a few steps, then peak RSS and XLA's accounting."""
    _, model, params, tokens = setup(args)
    step, state, frozen, _ = make_step(method, model, params, args.rank, args.dropout)
    key = jax.random.key(0)
    compiled = step.lower(state, frozen, tokens, key).compile()
    analysis = compiled.memory_analysis()
    state, loss = step(state, frozen, tokens, key)
    loss.block_until_ready()
    # Reset the kernel's high-water mark after compiling, so the peak is that of training
    # (compilation's own peak is much the same for every method and would hide the rest).
    with PeakRSS() as peak:
        for i in range(3):
            state, loss = step(state, frozen, tokens, jax.random.fold_in(key, i))
        loss.block_until_ready()
    return {
        "peak_rss_mb": peak.mb,
        "rss_before_steps_mb": peak.before_mb,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "xla_temp_mb": analysis.temp_size_in_bytes / 2**20,
        "xla_args_mb": analysis.argument_size_in_bytes / 2**20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._memory:
        print(json.dumps(memory_of(args._memory, args)))
        return

    methods = args.methods.split(",")
    cfg, model, params, tokens = setup(args)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: hidden {cfg.hidden_size}, "
        f"FFN {cfg.intermediate_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
        f"batch {args.batch}x{args.seq}, rank {args.rank}, dropout {args.dropout}"
    )
    runs = {}
    for m in methods:
        step, state, frozen, n = make_step(m, model, params, args.rank, args.dropout)
        t0 = time.perf_counter()
        state, loss = step(state, frozen, tokens, jax.random.key(0))
        loss.block_until_ready()
        runs[m] = {"step": step, "frozen": frozen, "params": n}
        runs[m]["compile_s"] = time.perf_counter() - t0
        state, loss = step(state, frozen, tokens, jax.random.key(1))  # warm-up
        runs[m]["state"] = state
        runs[m]["times"] = []
    for r in range(args.rounds):
        for m in methods:
            run = runs[m]
            state = run["state"]
            for i in range(args.steps):
                t0 = time.perf_counter()
                state, loss = run["step"](state, run["frozen"], tokens, jax.random.key(100 * r + i))
                loss.block_until_ready()
                run["times"].append(time.perf_counter() - t0)
            run["state"] = state

    results = {}
    for m in methods:
        results[m] = {
            "step_s": statistics.median(runs[m]["times"]),
            "trainable_params": runs[m]["params"],
            "compile_s": runs[m]["compile_s"],
        }
    del runs
    if not args.no_memory:
        for m in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory", m]
            cmd += ["--rank", str(args.rank), "--dropout", str(args.dropout)]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[m].update(json.loads(out.strip().splitlines()[-1]))

    base = results.get("lora")
    header = f"{'method':<12}{'trainable':>12}{'step s':>9}{'/LoRA':>7}"
    if not args.no_memory:
        header += f"{'RSS MB':>9}{'/LoRA':>7}{'XLA temp MB':>13}{'/LoRA':>7}"
    print(header)
    for m, r in results.items():
        line = f"{m:<12}{r['trainable_params']:>12,}{r['step_s']:>9.3f}"
        line += f"{r['step_s'] / base['step_s']:>7.2f}" if base else f"{'':>7}"
        if not args.no_memory:
            line += f"{r['peak_rss_mb']:>9.0f}"
            line += f"{r['peak_rss_mb'] / base['peak_rss_mb']:>7.3f}" if base else f"{'':>7}"
            line += f"{r['xla_temp_mb']:>13.1f}"
            line += f"{r['xla_temp_mb'] / base['xla_temp_mb']:>7.3f}" if base else f"{'':>7}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
