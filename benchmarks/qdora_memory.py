"""Memory and step time of QDoRA (quantised frozen base) vs DoRA on SmolLM2-135M.

Every method runs in its own process: load SmolLM2-135M (GGUF, float32), wrap the targeted
projections with DoRA, quantise their base (``qdora_*``), drop the float kernels, compile a
training step (forward, backward, AdamW on the adapter leaves), then measure. Not a test:
the numbers are for reading.

    python benchmarks/qdora_memory.py                        # all 7 projections, r=8, 8x64
    python benchmarks/qdora_memory.py --methods dora,qdora_nf4 --targets q,v --json out.json

Methods: ``dora`` (float32 base), ``qdora_nf4`` and ``qdora_int8`` (requantised, blocks of
64, float32 scales), ``qdora_q4_1`` (the file's own Q4_1 blocks, float16 scale and min per
32 weights). Columns: bytes of the adapted kernels' base and of the whole frozen tree
(embeddings and norms stay float32), resident memory before training, peak resident memory
during training steps (after compilation; dora_jax.memory), XLA's argument and temporary
buffers of the compiled step, and the median step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import optax
from _cli import add_names, at_least

import dora_jax
from dora_jax.experiments import training
from dora_jax.memory import PeakRSS, release_free_heap, rss_mb
from dora_jax.models import smollm2
from dora_jax.models.llama import PROJECTIONS, Llama, projection_regex

METHODS = ("dora", "qdora_nf4", "qdora_int8", "qdora_q4_1")


def setup(method: str, args):
    """(model, frozen, trainable): the float kernels that were quantised are released."""
    config, variables, _ = smollm2.load_smollm2(scan_layers=True)
    model = Llama(config)
    targets = projection_regex(args.targets)
    adapted = dora_jax.wrap(
        variables["params"], rank=args.rank, targets=targets, axes={"^layers/": (1, 1)}
    )
    del variables
    if method == "qdora_q4_1":
        adapted = dora_jax.quantize_base(adapted, smollm2.q4_1_kernels(scan_layers=True))
    elif method != "dora":
        adapted = dora_jax.quantize_base(adapted, method.removeprefix("qdora_"), block=64)
    frozen, trainable = dora_jax.partition(adapted)
    del adapted
    # Drop what setup compiled (eager ops, quantisers): the figures are those of training.
    jax.clear_caches()
    gc.collect()
    return model, frozen, trainable


def bases(tree):
    nodes = jax.tree.leaves(tree, is_leaf=dora_jax.is_adapter)
    return [n.base for n in nodes if dora_jax.is_adapter(n)]


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(method: str, args) -> dict:
    model, frozen, trainable = setup(method, args)
    base = bases(frozen)
    n_base = sum(b.size for b in base)
    base_bytes = sum(nbytes(b) for b in base)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 49152)
    tx = optax.adamw(1e-4)
    inner_step = training.make_train_step(model.apply, tx, jit=False)

    # The frozen half is an argument, not a closure (closed over, it would be a constant).
    def step(state, frozen, tokens):
        t, opt, loss = inner_step(*state, frozen, {"tokens": tokens}, None)
        return (t, opt), loss

    state = (trainable, tx.init(trainable))
    release_free_heap()
    rss_setup = rss_mb()
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, tokens).compile()
    analysis = compiled.memory_analysis()
    state, loss = compiled(state, frozen, tokens)
    loss.block_until_ready()
    times = []
    with PeakRSS() as peak:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, loss = compiled(state, frozen, tokens)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
    return {
        "base_params": n_base,
        "base_mb": base_bytes / 2**20,
        "base_bytes_per_param": base_bytes / n_base,
        "frozen_mb": nbytes(frozen) / 2**20,
        "rss_setup_mb": rss_setup,
        "peak_rss_mb": peak.mb,
        "xla_args_mb": analysis.argument_size_in_bytes / 2**20,
        "xla_temp_mb": analysis.temp_size_in_bytes / 2**20,
        "step_s": statistics.median(times),
        "loss": float(loss),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_names(p, "--methods", METHODS)
    add_names(p, "--targets", PROJECTIONS)
    p.add_argument("--rank", type=at_least(1), default=8)
    p.add_argument("--batch", type=at_least(1), default=8)
    p.add_argument("--seq", type=at_least(2), default=64)
    p.add_argument("--steps", type=at_least(1), default=5, help="measured steps per method")
    p.add_argument("--json", default=None, help="write results here (memory keys: MiB)")
    p.add_argument("--_one", default=None, choices=METHODS, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args._one:
        print(json.dumps(measure(args._one, args)))
        return

    results = {}
    targets = ",".join(args.targets)
    for m in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--_one", m, "--targets", targets]
        cmd += ["--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(
                f"{m}: {' '.join(cmd)} exited {proc.returncode}; its stderr ends:\n"
                f"{proc.stderr[-3000:]}"
            )
        results[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"SmolLM2-135M, jax {jax.__version__} {jax.devices()[0].platform}, DoRA r={args.rank} "
        f"on {targets}, batch {args.batch}x{args.seq}, AdamW, float32 compute; memory in MiB"
    )
    ref = results.get("dora")
    cols = ("base MiB", "B/param", "frozen MiB", "RSS setup", "peak RSS", "/DoRA", "XLA temp",
            "step s", "/DoRA")  # fmt: skip
    print(f"{'method':<12}" + "".join(f"{c:>11}" for c in cols))
    for m, r in results.items():
        cells = [f"{r['base_mb']:.1f}", f"{r['base_bytes_per_param']:.3f}", f"{r['frozen_mb']:.1f}",
                 f"{r['rss_setup_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "",
                 f"{r['xla_temp_mb']:.1f}", f"{r['step_s']:.3f}",
                 f"{r['step_s'] / ref['step_s']:.2f}" if ref else ""]  # fmt: skip
        print(f"{m:<12}" + "".join(f"{c:>11}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
