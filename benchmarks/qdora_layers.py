"""Memory of a QDoRA gradient in unrolled and scanned stacks of layers, by XLA's accounting.

A stack of ``--layers`` square kernels (``x = tanh(x @ W)``), DoRA on every kernel, the base
float32 or quantised; the gradient of the trainable half (the frozen half an argument, as in
training). Prints arguments + temporaries of the compiled forward pass and gradient in MiB,
for a Python loop of layers (``unrolled``) and a ``lax.scan`` over stacked kernels
(``scanned``). Not a test: the numbers are for reading.

    python benchmarks/qdora_layers.py                      # 2, 4, 8 layers of 1024x1024, NF4
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
        python benchmarks/qdora_layers.py                  # XLA:CPU's other scheduler

XLA:CPU's default (concurrency-optimised) scheduler runs every unrolled layer's
dequantisation, which depends on no activation, ahead of the matmuls; the flag (read when
jax starts, not a per-``jit`` compiler option) turns it off.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from _cli import add_names, at_least

import dora_jax

FORMATS = ("float32", "nf4", "int8")


def measure(layers: int, width: int, batch: int, fmt: str, scanned: bool) -> dict:
    """MiB of arguments + temporaries of the compiled forward pass and gradient."""
    keys = jax.random.split(jax.random.key(0), layers + 2)
    if scanned:
        params = {"kernel": jnp.stack([jax.random.normal(k, (width, width)) for k in keys[:-2]])}
        params["kernel"] = params["kernel"] / width**0.5
        adapted = dora_jax.wrap(params, rank=8, key=keys[-1], axes={"kernel": dora_jax.Axes(1, 1)})

        def model(p, x):
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["kernel"])[0]

    else:
        params = {
            f"layer_{i}": {"kernel": jax.random.normal(keys[i], (width, width)) / width**0.5}
            for i in range(layers)
        }
        adapted = dora_jax.wrap(params, rank=8, key=keys[-1])

        def model(p, x):
            for i in range(layers):
                x = jnp.tanh(x @ p[f"layer_{i}"]["kernel"])
            return x

    if fmt != "float32":
        adapted = dora_jax.quantize_base(adapted, fmt)
    frozen, trainable = dora_jax.partition(adapted)
    forward = dora_jax.apply(model)
    x = jax.random.normal(keys[-2], (batch, width))

    def output(t, f):
        return forward(dora_jax.combine(f, t), x)

    def loss(t, f):
        return jnp.sum(output(t, f) ** 2)

    def mib(fn) -> float:
        m = jax.jit(fn).lower(trainable, frozen).compile().memory_analysis()
        return round((m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20, 1)

    return {"forward": mib(output), "gradient": mib(jax.grad(loss))}


def layer_counts(text: str) -> list[int]:
    """An argparse ``type``: comma-separated layer counts, each at least 1."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each count must be at least 1")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=layer_counts, default="2,4,8", help="e.g. 2,4,8")
    p.add_argument("--width", type=at_least(8), default=1024)
    p.add_argument("--batch", type=at_least(1), default=8)
    add_names(p, "--formats", FORMATS, default="float32,nf4")
    p.add_argument("--json", default=None)
    return p


def main() -> None:
    args = parser().parse_args()
    flags = os.environ.get("XLA_FLAGS", "")
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; XLA_FLAGS={flags!r}; {args.width}x"
        f"{args.width} kernels, batch {args.batch}, DoRA r=8; MiB of arguments + temporaries "
        f"(forward / gradient)"
    )
    rows = []
    header = ["layers"] + [f"{f} {lay}" for lay in ("unrolled", "scanned") for f in args.formats]
    print(" | ".join(header))
    for n in args.layers:
        cells = []
        for layout in ("unrolled", "scanned"):
            for fmt in args.formats:
                r = measure(n, args.width, args.batch, fmt, layout == "scanned")
                rows.append({"layers": n, "layout": layout, "format": fmt, **r})
                cells.append(f"{r['forward']} / {r['gradient']}")
        print(" | ".join([str(n), *cells]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
