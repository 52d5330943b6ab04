"""Per-device bytes of the base, the adapters and the optimiser state, on 1 and 8 devices.

Builds a DoRA-wrapped Llama directly on its shardings (``jit`` with ``out_shardings``, so no
device ever holds the whole model), then sums the bytes of the shards each device holds;
the 8-device meshes run in a subprocess on simulated CPU devices. Also saves one adapter
checkpoint (adapters + AdamW state) and prints its size next to the base model's.

    python benchmarks/sharding_memory.py                      # SmolLM2-135M shape, bf16 base
    python benchmarks/sharding_memory.py --config bench --dtype float32 --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
from _cli import at_least

import dora_jax
from dora_jax import checkpoint, sharding
from dora_jax.models.llama import Llama, LlamaConfig, projection_regex

PROJECTIONS = projection_regex()
CONFIGS = {
    "tiny": LlamaConfig.tiny,
    "bench": LlamaConfig.bench,
    "smollm2": LlamaConfig.smollm2_135m,
}
DTYPES = ("bfloat16", "float16", "float32")
MESHES_8 = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")


def build(args, mesh):
    """(adapted, opt_state) created on their shardings."""
    cfg = CONFIGS[args.config]()
    model = Llama(cfg, param_dtype=jnp.dtype(args.dtype))
    dummy = jnp.zeros((1, 8), jnp.int32)

    def init(key):
        params = model.init(key, dummy)["params"]
        return dora_jax.wrap(params, rank=args.rank, targets=PROJECTIONS)

    shapes = jax.eval_shape(init, jax.random.key(0))
    adapted = jax.jit(init, out_shardings=sharding.shardings(shapes, mesh))(jax.random.key(0))
    _, trainable = dora_jax.partition(adapted)
    _, trainable_sh = dora_jax.partition(sharding.shardings(adapted, mesh))
    tx = optax.adamw(1e-4)
    opt_sh = sharding.opt_state_shardings(
        jax.eval_shape(tx.init, trainable), trainable, trainable_sh, mesh
    )
    return adapted, jax.jit(tx.init, out_shardings=opt_sh)(trainable)


def per_device_bytes(tree) -> int:
    """The largest number of bytes of ``tree``'s shards that any one device holds."""
    held: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def _randomised(tree):
    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.random.normal(jax.random.key(x.size), x.shape, x.dtype)

    return jax.tree.map(one, tree)


def measure(args, spec: str) -> dict:
    mesh = sharding.mesh_from_string(spec)
    adapted, opt_state = build(args, mesh)
    frozen, trainable = dora_jax.partition(adapted)
    row = {
        "mesh": "x".join(str(n) for n in mesh.shape.values()),
        "devices": mesh.size,
        "base": per_device_bytes(frozen),
        "adapters": per_device_bytes(trainable),
        "optimiser": per_device_bytes(opt_state),
    }
    if mesh.size == 1:
        # At step 0, B and Adam's moments are zeros, which orbax's compression squeezes to
        # nothing: fill them with random values, as after training, for an honest size.
        adapted = dora_jax.combine(frozen, _randomised(trainable))
        with tempfile.TemporaryDirectory() as d:
            manager = checkpoint.manager(d, async_save=False)
            checkpoint.save(manager, 0, adapted, _randomised(opt_state), key=jax.random.key(0))
            row["checkpoint_bytes"] = checkpoint.size_bytes(manager)
            manager.close()
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="smollm2", choices=sorted(CONFIGS))
    p.add_argument(
        "--dtype", default="bfloat16", choices=DTYPES, help="base dtype (adapters: float32)"
    )
    p.add_argument("--rank", type=at_least(1), default=16)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    if args._worker is not None:
        print("ROWS" + json.dumps([measure(args, s) for s in args._worker.split(";")]))
        return

    rows = [measure(args, "")]
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", ";".join(MESHES_8)]
    cmd += ["--config", args.config, "--dtype", args.dtype, "--rank", str(args.rank)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(
            f"the 8-device worker ({' '.join(cmd)}) exited {proc.returncode}; its stderr "
            f"ends:\n{proc.stderr[-3000:]}"
        )
    rows += json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS"))[4:])

    mib = 2**20
    print(
        f"{args.config} Llama, base {args.dtype}, DoRA r={args.rank} on all 7 projections "
        f"(float32), AdamW state; MiB per device (data x fsdp x tensor)"
    )
    print(f"{'mesh':<10}{'base':>10}{'adapters':>10}{'optimiser':>11}{'total':>10}{'vs 1':>7}")
    single = None
    for r in rows:
        total = r["base"] + r["adapters"] + r["optimiser"]
        single = single or total
        print(
            f"{r['mesh']:<10}{r['base'] / mib:>10.2f}{r['adapters'] / mib:>10.2f}"
            f"{r['optimiser'] / mib:>11.2f}{total / mib:>10.2f}{total / single:>7.3f}"
        )
    r = rows[0]
    print(
        f"checkpoint on disk: {r['checkpoint_bytes'] / mib:.2f} MiB (adapters "
        f"{r['adapters'] / mib:.2f} + AdamW {r['optimiser'] / mib:.2f} MiB + metadata); "
        f"base model {r['base'] / mib:.2f} MiB: {r['base'] / r['checkpoint_bytes']:.1f}x larger"
    )


if __name__ == "__main__":
    main()
