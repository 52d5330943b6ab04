"""Sharded DoRA training of a Llama on any mesh, with checkpoints that resume exactly.

The same command runs on one CPU, on simulated CPU devices, on processes joined over
loopback and on every host of a TPU pod. Tokens are random (this script is about sharding
and resuming, not about what is learnt): batch ``i`` is drawn from seed ``i``, so the data
position is one int.

    python experiments/train_sharded.py --steps 10
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python experiments/train_sharded.py --mesh data=2,fsdp=2,tensor=2 --ckpt /tmp/run
    # TPU pod: every host runs the same line (jax.distributed.initialize() finds the pod)
    python experiments/train_sharded.py --distributed --config smollm2 --mesh fsdp=-1 ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import checkpoint, sharding
from dora_jax.experiments import training
from dora_jax.models.llama import Llama, LlamaConfig, next_token_loss, projection_regex

PROJECTIONS = projection_regex()
CONFIGS = {
    "tiny": LlamaConfig.tiny,
    "bench": LlamaConfig.bench,
    "smollm2": LlamaConfig.smollm2_135m,
}


def cross_entropy(logits, tokens):
    return next_token_loss(logits, tokens)


def tokens_at(index: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """Batch ``index`` of the (random) data stream, the same in every process."""
    return np.random.default_rng(index).integers(0, vocab, (batch, seq), dtype=np.int32)


class Trainer:
    """The sharded state and the jitted step for one mesh."""

    def __init__(self, cfg: LlamaConfig, mesh, *, rank=4, method="dora", lr=1e-2, seed=0):
        self.cfg, self.mesh = cfg, mesh
        self.model = Llama(cfg)
        dummy = jnp.zeros((1, 8), jnp.int32)
        # Every process computes the same host values; put() keeps each process's shards.
        params = jax.jit(self.model.init)(jax.random.key(seed), dummy)["params"]
        adapted = dora_jax.wrap(params, rank=rank, method=method, targets=PROJECTIONS)
        self.shardings = sharding.shardings(adapted, mesh)
        adapted = sharding.put(adapted, self.shardings)
        self.frozen, trainable = dora_jax.partition(adapted)
        frozen_sh, trainable_sh = dora_jax.partition(self.shardings)

        self.tx = optax.adamw(lr)
        opt_shape = jax.eval_shape(self.tx.init, trainable)
        opt_sh = sharding.opt_state_shardings(opt_shape, trainable, trainable_sh, mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(trainable)
        replicated = NamedSharding(mesh, P())
        key = jax.jit(lambda: jax.random.key(seed + 1), out_shardings=replicated)()
        self.state = (trainable, opt_state, key)
        self.batch_sharding = sharding.batch_sharding(mesh)

        inner_step = training.make_train_step(self.model.apply, self.tx, jit=False)

        def train_step(state, frozen, tokens):
            trainable, opt_state, key = state
            key, sub = jax.random.split(key)  # where dropout would draw; saved with the state
            trainable, opt_state, loss = inner_step(
                trainable, opt_state, frozen, {"tokens": tokens}, sub
            )
            return (trainable, opt_state, key), loss

        state_sh = (trainable_sh, opt_sh, replicated)
        self.step_fn = jax.jit(
            train_step,
            in_shardings=(state_sh, frozen_sh, self.batch_sharding),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        )

    def adapted(self):
        return dora_jax.combine(self.frozen, self.state[0])

    def step(self, index: int, batch: int, seq: int) -> float:
        tokens = sharding.put(tokens_at(index, batch, seq, self.cfg.vocab_size),
                              self.batch_sharding)  # fmt: skip
        self.state, loss = self.step_fn(self.state, self.frozen, tokens)
        return float(np.asarray(loss.addressable_data(0)))

    def save(self, manager, step: int) -> None:
        trainable, opt_state, key = self.state
        checkpoint.save(manager, step, self.adapted(), opt_state, key=key, data_position=step)

    def restore(self, manager) -> int:
        """Resumes from the latest complete checkpoint; returns the next batch index."""
        r = checkpoint.restore(manager, self.adapted(), self.state[1])
        _, trainable = dora_jax.partition(r.adapted)
        self.state = (trainable, r.opt_state, r.key)
        return r.data_position

    def trainable_numpy(self) -> dict[str, np.ndarray]:
        """The trainable leaves as host arrays, gathered from every process."""
        leaves = jax.tree_util.tree_flatten_with_path(self.state[0])[0]
        out = {}
        for path, x in leaves:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                x = multihost_utils.process_allgather(x, tiled=True)
            out[dora_jax.tree.path_str(path)] = np.asarray(x)
        return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--mesh", default="", help="e.g. data=2,fsdp=2,tensor=2 (default: fsdp)")
    parser.add_argument("--steps", type=int, default=10, help="the step to train up to (>= 1)")
    parser.add_argument("--batch", type=int, default=8,
                        help="rows per step, a multiple of the mesh's data x fsdp")  # fmt: skip
    parser.add_argument("--seq", type=int, default=32, help="tokens per row (>= 2)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--method", default="dora", choices=dora_jax.tree.METHODS)
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (> 0)")
    parser.add_argument("--ckpt", default=None, help="checkpoint folder; resumes if it has one")
    parser.add_argument("--save-every", type=int, default=5,
                        help="checkpoint every this many steps, and the last step")  # fmt: skip
    parser.add_argument("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None,
                        help="write losses and final params: OUT(.npz) and OUT.json")  # fmt: skip
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize")
    parser.add_argument("--coordinator", default=None, help="host:port (omit on a TPU pod)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args(argv)
    # Checked here, not left to the run: a step count below 1 trains nothing and exits 0,
    # a negative rate trains by gradient ascent, and a zero rank or batch ends in a
    # traceback from deep inside jax.
    training.check_at_least(parser, 1, {"--steps": args.steps, "--batch": args.batch,
                                        "--rank": args.rank})  # fmt: skip
    training.check_at_least(parser, 2, {"--seq": args.seq}, " (a token and the next one to "
                            "predict)")  # fmt: skip
    training.check_positive(parser, "--lr", args.lr)
    if args.save_every < 1:
        parser.error(f"--save-every {args.save_every}: checkpoint every N >= 1 steps")
    if not 0 <= args.step_sleep < math.inf:
        parser.error(f"--step-sleep {args.step_sleep}: pass seconds >= 0")
    if args.num_processes is not None:
        training.check_at_least(parser, 1, {"--num-processes": args.num_processes})
    if args.process_id is not None:
        training.check_at_least(parser, 0, {"--process-id": args.process_id})
        if args.num_processes is not None and args.process_id >= args.num_processes:
            parser.error(f"--process-id {args.process_id}: processes are numbered 0 to "
                         f"--num-processes - 1 = {args.num_processes - 1}")  # fmt: skip
    if args.out is not None:
        # Written after training (its folder created first): a file in the way would lose
        # the run.
        training.check_out(parser, str(Path(args.out).parent), "--out's folder")
    return args


def save_step(i: int, steps: int, save_every: int) -> bool:
    """Whether the state after step ``i + 1`` is saved: every ``save_every`` steps, and the
    last step always, so a run ends with its final state on disk."""
    return (i + 1) % save_every == 0 or i + 1 == steps


def main(argv=None):
    args = parse_args(argv)

    if args.distributed:
        # On a TPU pod all three are found from the environment; on CPU say them.
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    try:
        mesh = sharding.mesh_from_string(args.mesh)
    except ValueError as e:
        raise SystemExit(f"--mesh {args.mesh!r}: {e}") from None
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.axis_names)
    if args.batch % shards:
        raise SystemExit(f"--batch {args.batch} must divide by the mesh's data x fsdp = "
                         f"{shards}; pass a multiple of {shards}.")  # fmt: skip
    if args.out and jax.process_index() == 0:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--out {args.out}: cannot create its folder ({e}).") from None
    cfg = CONFIGS[args.config]()
    trainer = Trainer(cfg, mesh, rank=args.rank, method=args.method, lr=args.lr)
    manager = checkpoint.manager(args.ckpt) if args.ckpt else None
    start = 0
    if manager is not None and manager.latest_step() is not None:
        start = trainer.restore(manager)
        print(f"resumed from step {start}", flush=True)
    if jax.process_index() == 0:
        print(f"{jax.process_count()} processes, {jax.device_count()} devices, mesh "
              f"{dict(mesh.shape)}", flush=True)  # fmt: skip
    losses = {}
    for i in range(start, args.steps):
        t0 = time.perf_counter()
        losses[i] = trainer.step(i, args.batch, args.seq)
        if jax.process_index() == 0:
            print(f"step {i + 1} loss {losses[i]:.6f} ({time.perf_counter() - t0:.2f} s)",
                  flush=True)  # fmt: skip
        if manager is not None and save_step(i, args.steps, args.save_every):
            trainer.save(manager, i + 1)
        time.sleep(args.step_sleep)
    if manager is not None:
        manager.wait_until_finished()
        if jax.process_index() == 0:
            size = checkpoint.size_bytes(manager)
            base = checkpoint.fingerprint(trainer.frozen)["bytes"]
            print(f"checkpoint {size:,} bytes on disk; base model {base:,} bytes "
                  f"({base / size:.1f}x)", flush=True)  # fmt: skip
        manager.close()
    params = trainer.trainable_numpy()
    if args.out and jax.process_index() == 0:
        np.savez(args.out, **params)
        with open(args.out + ".json", "w") as f:
            json.dump({str(k): v for k, v in losses.items()}, f)


if __name__ == "__main__":
    main()
