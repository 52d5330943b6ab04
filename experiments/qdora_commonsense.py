"""QDoRA vs DoRA accuracy on SmolLM2-135M: a short commonsense fine-tuning run.

Same recipe for every method; only the frozen base differs: ``dora`` keeps the float32
kernels (the GGUF file dequantised), ``qdora_nf4`` / ``qdora_int8`` requantise the adapted
kernels (NF4 or int8, blocks of 64), ``qdora_q4_1`` keeps the file's own Q4_1 blocks (so its
base is bit-identical to ``dora``'s and only the storage differs). Each task's validation
set is split with a fixed seed into a training half and a held-out half; methods train on
the training halves and are scored on held-out examples by answer log-likelihood.

    python experiments/qdora_commonsense.py                  # ARC-e + WinoGrande, 100 steps
    python experiments/qdora_commonsense.py --methods dora,qdora_nf4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp

import dora_jax
from dora_jax.experiments import commonsense, training
from dora_jax.models import smollm2
from dora_jax.models.llama import PROJECTIONS, Llama, projection_regex

# The frozen base of each method: float32, requantised (NF4, int8) or the file's own Q4_1.
METHODS = ("dora", "qdora_nf4", "qdora_int8", "qdora_q4_1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="dora,qdora_nf4,qdora_q4_1",
                   help=f"comma list of {METHODS}")  # fmt: skip
    p.add_argument("--tasks", default="arc_e,winogrande",
                   help=f"comma list of {commonsense.ALL_TASKS}")  # fmt: skip
    p.add_argument("--targets", default="q,v", help=f"comma list of {sorted(PROJECTIONS)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=100, help="training steps (at least 2)")
    p.add_argument("--batch", type=int, default=8, help="packed training rows per step")
    p.add_argument("--seq", type=int, default=64,
                   help="training row length, and the scoring context cap (tokens)")  # fmt: skip
    p.add_argument("--eval-examples", type=int, default=200,
                   help="held-out examples per task (0 = all)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None,
                   help="write the arguments and results here (folder created)")  # fmt: skip
    args = p.parse_args(argv)
    args.methods = training.comma_list(p, "--methods", args.methods, choices=METHODS)
    args.tasks = training.comma_list(p, "--tasks", args.tasks, choices=commonsense.ALL_TASKS)
    args.targets = training.comma_list(p, "--targets", args.targets, choices=sorted(PROJECTIONS))
    training.check_steps(p, args.steps)
    training.check_positive(p, "--lr", args.lr)
    training.check_at_least(p, 1, {"--rank": args.rank, "--batch": args.batch})
    training.check_at_least(p, 2, {"--seq": args.seq}, " (a prompt token and an answer token)")
    training.check_at_least(p, 0, {"--eval-examples": args.eval_examples}, " (0 scores all)")
    training.check_at_least(p, 0, {"--seed": args.seed})
    if args.json is not None:
        # Written after every method has trained and been scored: refuse now what would
        # fail then.
        if Path(args.json).is_dir():
            p.error(f"--json {args.json}: a folder; pass a file path, e.g. "
                    f"{Path(args.json) / 'qdora.json'}")  # fmt: skip
        training.check_out(p, str(Path(args.json).parent), "--json's folder")
    return args


def adapt(method: str, params, args, axes):
    """DoRA on the targeted kernels, with the base quantised as the method says."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    adapted = dora_jax.wrap(
        params,
        rank=args.rank,
        targets=projection_regex(args.targets),
        axes=axes,
        key=jax.random.key(args.seed),
    )
    if method == "qdora_q4_1":
        return dora_jax.quantize_base(adapted, smollm2.q4_1_kernels(scan_layers=True))
    if method.startswith("qdora_"):
        return dora_jax.quantize_base(adapted, method.removeprefix("qdora_"), block=64)
    return adapted


def train(model, adapted, batches, args):
    frozen, trainable = dora_jax.partition(adapted)
    tx = training.optimizer(args.lr, args.steps)
    step = training.make_train_step(model.apply, tx)

    def report(i, loss, _):
        if i % 20 == 0 or i == args.steps - 1:
            print(f"  step {i:4d} loss {loss:.3f}", flush=True)

    trainable, _, losses, times, _ = training.run_steps(
        step, trainable, tx.init(trainable), frozen, batches, args.steps, jax.random.key(0),
        on_step=report,
    )  # fmt: skip
    return dora_jax.combine(frozen, trainable), losses, times


def evaluate(model, adapted, held_out, tokenizer, args):
    # Quantised bases merge to float kernels: scoring runs the merged model.
    results = training.evaluate(
        training.make_logprob_fn(model.apply), adapted, held_out, tokenizer, batch_size=8,
        seq_len=args.seq, pad_id=tokenizer.token_to_id("<|endoftext|>") or 0,
    )  # fmt: skip
    return {task: r.primary for task, r in results.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--json {args.json}: cannot create its folder ({e}).") from None
    config, variables, tokenizer = smollm2.load_smollm2(scan_layers=True)
    params = variables["params"]
    model = Llama(config)
    train_examples, held_out = commonsense.train_and_held_out(
        args.tasks, eval_examples=args.eval_examples
    )
    sample = jnp.zeros((1, 8), jnp.int32)
    axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, sample)
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    print(f"{len(train_examples)} training examples; held out "
          + ", ".join(f"{t} {len(e)}" for t, e in held_out.items()), flush=True)  # fmt: skip

    results = {}
    for method in args.methods:
        adapted = adapt(method, params, args, axes)
        batches = commonsense.training_batches(
            train_examples, tokenizer, args.batch, args.seq, seed=args.seed, pad_id=pad_id
        )
        print(f"{method}:", flush=True)
        adapted, losses, times = train(model, adapted, batches, args)
        acc = evaluate(model, adapted, held_out, tokenizer, args)
        acc["mean"] = statistics.fmean(acc.values())
        results[method] = dict(
            accuracy=acc,
            first_loss=losses[0],
            final_loss=statistics.fmean(losses[-10:]),
            step_s=statistics.median(times[1:]),  # step 0 includes compilation
        )
        print(f"  {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)

    tasks = list(held_out)
    print(f"\n| method | {' | '.join(tasks)} | mean | loss (last 10) | step s |")
    print("|---" * (len(tasks) + 4) + "|")
    for m, r in results.items():
        a = r["accuracy"]
        cells = [f"{100 * a[t]:.1f}" for t in [*tasks, "mean"]]
        cells += [f"{r['final_loss']:.3f}", f"{r['step_s']:.2f}"]
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
