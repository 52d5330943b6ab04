"""Scoring and training throughput of the main job's data paths, before and after packing.

One process, SmolLM2-135M, a small slice of the held-out and training halves:

- scoring: one row per choice with logits everywhere (``packed=False``, the layout of a
  plain harness) against the choices of each example sharing their prefix, several
  examples per row, logits at the answer tokens only (``packed=True``), both through the
  same jitted function; examples scored per second, after compilation;
- training: one example per right-padded row of 64 tokens with logits everywhere against
  packed rows of 128 tokens with logits at the answer tokens; DoRA r=8 on q, k, v, up, down;
  real (non-padding) tokens and examples trained per second, after compilation.

Runs interleave the two layouts (``--rounds``) so that load from other processes hits
both alike; compare ratios from one run.

    python benchmarks/commonsense_throughput.py --examples 24 --steps 3 --rounds 2
    python benchmarks/commonsense_throughput.py --count-only --examples 150   # no timing

``--count-only`` counts, without running the model, the token positions and vocabulary
rows each layout computes per example (what the work ratio is, whatever the machine's load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from _cli import add_names, at_least

import dora_jax
from dora_jax.experiments import commonsense, training
from dora_jax.models import smollm2
from dora_jax.models.llama import Llama, projection_regex


def count_work(args) -> None:
    """Token positions and vocabulary rows per example of each layout (no model run)."""
    import gguf
    import numpy as np

    tokenizer = smollm2.tokenizer_from_gguf(gguf.GGUFReader(str(smollm2.find_gguf())))
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    train, held_out = commonsense.train_and_held_out(args.tasks,
                                                     eval_examples=args.examples)  # fmt: skip
    n = sum(len(v) for v in held_out.values())
    for packed, batch_size in ((False, 32), (True, 8)):
        shapes = []

        def fake(batch, shapes=shapes):
            shapes.append((batch["tokens"].size, batch["targets"].size))
            return np.zeros(batch["targets"].shape, np.float32)

        for examples in held_out.values():
            commonsense.score_multiple_choice(
                fake, examples, tokenizer, batch_size, 64, progress=False, packed=packed,
                pad_id=pad_id,
            )  # fmt: skip
        print(f"scoring, {'packed' if packed else 'unpacked'}: {len(shapes)} forwards, "
              f"{sum(a for a, _ in shapes) / n:.0f} token positions and "
              f"{sum(b for _, b in shapes) / n:.1f} vocabulary rows per example")  # fmt: skip
    for pack, seq in ((False, 64), (True, 128)):
        positions = real = examples = rows = 0
        for b in commonsense.training_batches(train, tokenizer, 8, seq, pad_id=pad_id, pack=pack,
                                              epochs=1):  # fmt: skip
            positions += b["tokens"].size
            real += int((b["segments"] > 0).sum())
            rows += b["targets"].size
            examples += int(sum(len(set(r[r > 0])) for r in b["segments"]))
        print(f"training, {'packed' if pack else 'unpacked'} rows of {seq}: "
              f"{positions / examples:.0f} token positions per example ({real / positions:.0%} "
              f"real), {rows / examples:.1f} vocabulary rows per example")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_names(p, "--tasks", commonsense.TASKS, "winogrande,obqa,arc_e")
    p.add_argument("--examples", type=at_least(1), default=24, help="held-out examples per task")
    p.add_argument("--steps", type=at_least(1), default=3, help="timed training steps per round")
    p.add_argument("--rounds", type=at_least(1), default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--count-only", action="store_true", help="count work, do not time")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.count_only:
        return count_work(args)

    config, params, tokenizer = training.load_llama(scan_layers=True)
    model = Llama(config)
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    train, held_out = commonsense.train_and_held_out(args.tasks,
                                                     eval_examples=args.examples)  # fmt: skip
    n_eval = sum(len(v) for v in held_out.values())
    logprob_fn = training.make_logprob_fn(model.apply)

    layouts = {
        "unpacked": dict(score=dict(packed=False, batch_size=32), train=dict(pack=False, seq=64)),
        "packed": dict(score=dict(packed=True, batch_size=8), train=dict(pack=True, seq=128)),
    }
    axes = dora_jax.infer_axes(
        lambda p, t: model.apply({"params": p}, t), params, jnp.zeros((1, 8), jnp.int32)
    )
    adapted = dora_jax.wrap(params, rank=8, targets=projection_regex(["q", "k", "v", "up", "down"]),
                            axes=axes)  # fmt: skip
    frozen, trainable = dora_jax.partition(adapted)
    tx = training.optimizer(1e-3, 100)
    step = training.make_train_step(model.apply, tx)
    opt_state = tx.init(trainable)

    def score(layout):
        kw = layouts[layout]["score"]
        for task, examples in held_out.items():
            commonsense.score_multiple_choice(
                lambda b: logprob_fn(params, b), examples, tokenizer, seq_len=64, task=task,
                progress=False, pad_id=pad_id, **kw,
            )  # fmt: skip

    batches = {
        name: commonsense.training_batches(
            train, tokenizer, 8, lay["train"]["seq"], pad_id=pad_id, pack=lay["train"]["pack"]
        )
        for name, lay in layouts.items()
    }

    def train_steps(layout, n):
        tokens = examples = 0
        state = (trainable, opt_state)
        t0 = time.perf_counter()
        for i in range(n):
            b = next(batches[layout])
            *state, loss = step(*state, frozen, b, jax.random.key(i))
            float(loss)
            tokens += int((b["segments"] > 0).sum())
            examples += int(sum(len(set(row[row > 0])) for row in b["segments"]))
        return time.perf_counter() - t0, tokens, examples

    # Compile every shape first (scoring buckets, both training layouts).
    for layout in layouts:
        score(layout)
        train_steps(layout, 1)
    results = {name: {"score_s": [], "train_s": [], "tokens": 0, "examples": 0}
               for name in layouts}  # fmt: skip
    for _ in range(args.rounds):
        for layout in layouts:
            t0 = time.perf_counter()
            score(layout)
            results[layout]["score_s"].append(time.perf_counter() - t0)
            seconds, tokens, examples = train_steps(layout, args.steps)
            results[layout]["train_s"].append(seconds)
            results[layout]["tokens"] += tokens
            results[layout]["examples"] += examples
    summary = {}
    for layout, r in results.items():
        summary[layout] = {
            "examples_scored_per_s": n_eval / statistics.median(r["score_s"]),
            "tokens_trained_per_s": r["tokens"] / sum(r["train_s"]),
            "examples_trained_per_s": r["examples"] / sum(r["train_s"]),
        }
    print(
        f"{n_eval} held-out examples ({','.join(args.tasks)}), {args.rounds} rounds, {args.steps} "
        f"training steps per round, DoRA r=8; {jax.devices()[0].platform}"
    )
    print("| layout | examples/s scored | tokens/s trained | examples/s trained |")
    print("|---|---|---|---|")
    for layout, s in summary.items():
        print(f"| {layout} | {s['examples_scored_per_s']:.2f} | {s['tokens_trained_per_s']:.0f} "
              f"| {s['examples_trained_per_s']:.2f} |")  # fmt: skip
    ratio = {k: summary["packed"][k] / summary["unpacked"][k] for k in summary["packed"]}
    print("packed / unpacked: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
