"""Cost of the base fingerprint that every checkpoint save and restore computes.

Prints the time to fingerprint a stacked bf16 kernel (16 x 4096 x 4096 = 256 Mi values,
512 MiB) next to a plain float32 sum of the same array, and the extrapolation to an 8B
model (8e9 values). Repeated saves of the same base hit a cache and cost nothing.

    python benchmarks/fingerprint.py [--layers 16]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from _cli import at_least

from dora_jax import checkpoint


def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=at_least(1), default=16, help="4096 x 4096 kernels stacked")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    x = jnp.ones((args.layers, 4096, 4096), jnp.bfloat16)
    tree = {"w": x}

    def fresh():
        checkpoint._FINGERPRINTS.clear()  # measure the computation, not the cache
        checkpoint.fingerprint(tree)

    plain = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t_fp = best_of(fresh)
    t_sum = best_of(lambda: plain(x).block_until_ready())
    t_cached = best_of(lambda: checkpoint.fingerprint(tree))
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{x.size / 2**20:.0f} Mi bf16 values ({x.nbytes / 2**20:.0f} MiB)")
    print(f"fingerprint {t_fp * 1e3:.1f} ms ({x.nbytes / t_fp / 1e9:.2f} GB/s), plain f32 sum "
          f"{t_sum * 1e3:.1f} ms: ratio {t_fp / t_sum:.1f}")  # fmt: skip
    print(f"8B values at this rate: {t_fp * 8e9 / x.size:.1f} s; cached: {t_cached * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
