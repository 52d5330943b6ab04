"""Training-step time and memory of LoRA, DoRA and full fine-tuning on a small Llama.

One process times every method (interleaved rounds, so machine noise hits all alike) and
prints ratios to LoRA; peak memory comes from a separate process per method, plus XLA's
own buffer accounting of the compiled step. Not a test: the numbers are for reading.

    python benchmarks/step_time.py                # default: hidden 512, FFN 1408, 4 layers
    python benchmarks/step_time.py --json out.json --rounds 7
    python benchmarks/step_time.py --layouts unscanned,scanned --methods lora,dora,vera,dvora \
        --no-memory                               # both layouts; XLA's accounting only
    python benchmarks/step_time.py --model smollm2 --batch 8 --seq 64 --layouts scanned \
        --methods lora,dora --no-memory --rounds 1 --steps 1   # SmolLM2-135M's shape

Methods: ``full`` (all weights), ``lora``, ``dora`` (dora_jax.apply, factored forward),
``dora_merge`` (W' formed inside the loss with dora_jax.merge: what a naive port does),
``dora_exact`` (factored, exact norm gradient), ``vera`` and ``dvora`` (rank
``--vera-rank``). Layouts: ``unscanned`` (a Python loop of layers) and ``scanned``
(``scan_layers=True``: one ``nn.scan`` stack, as large models are trained). Each row
reports the step's memory by XLA's accounting of the compiled step (temporaries +
arguments + outputs - aliased) and its ratio to LoRA (DVoRA: to VeRA).

Step time: ``step s`` is the median of every timed step. Its ``ratio`` is paired by round:
each round times ``--steps`` steps of every configuration in turn, and the ratio is the
median over rounds of (the configuration's median step in that round) / (the reference's),
with a 95% percentile-bootstrap interval over rounds (``scipy.stats.bootstrap``; from 5
rounds on). On a shared CPU single rounds scatter by several percent, so a ratio near a
bound needs many rounds (``--rounds 30``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import add_names, at_least, probability
from scipy import stats

import dora_jax
from dora_jax.memory import PeakRSS
from dora_jax.models.llama import Llama, LlamaConfig, next_token_loss, projection_regex

METHODS = ("full", "lora", "dora", "dora_merge", "dora_exact", "vera", "dvora")
LAYOUTS = ("unscanned", "scanned")
PROJECTIONS = projection_regex()


def cross_entropy(logits, tokens):
    return next_token_loss(logits, tokens)


def make_step(
    method: str,
    model,
    params,
    rank: int,
    dropout: float,
    lr: float = 1e-4,
    axes=None,
    vera_rank: int = 256,
):
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

    kind = method if method in ("lora", "vera", "dvora") else "dora"
    adapted = dora_jax.wrap(
        params,
        rank=vera_rank if kind in ("vera", "dvora") else rank,
        method=kind,
        targets=PROJECTIONS,
        dropout=dropout,
        axes=axes,
        **(
            {"exact_norm_grad": method == "dora_exact"} if kind != "vera" and kind != "lora" else {}
        ),
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


def setup(args, scanned: bool = False):
    """(config, model, params, tokens, axes); ``axes`` learnt from the model when scanned."""
    config = {"bench": LlamaConfig.bench, "smollm2": LlamaConfig.smollm2_135m}
    cfg = config[args.model](scan_layers=scanned)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    axes = None
    if scanned:
        axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, tokens)
    return cfg, model, params, tokens, axes


def xla_step_mb(step, state, frozen, tokens) -> float:
    """XLA's accounting of one compiled step in MiB: temporaries + arguments + outputs -
    aliased."""
    m = step.lower(state, frozen, tokens, jax.random.key(0)).compile().memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


def memory_of(method: str, args) -> dict:
    """Runs in a fresh process: compile, a few steps, then peak RSS and XLA's accounting
    (MiB, though the keys say ``mb``: the names the saved results use)."""
    _, model, params, tokens, axes = setup(args, args.layouts == ["scanned"])
    step, state, frozen, _ = make_step(
        method, model, params, args.rank, args.dropout, axes=axes, vera_rank=args.vera_rank
    )
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
        "xla_temp_mb": analysis.temp_size_in_bytes / 2**20,
        "xla_args_mb": analysis.argument_size_in_bytes / 2**20,
    }


def reference(method: str) -> str:
    """The method a row's ratios are to: VeRA for DVoRA, LoRA for the rest."""
    return "vera" if method == "dvora" else "lora"


def step_ratio_stats(rounds: list[float], reference_rounds: list[float]) -> dict:
    """Median over rounds of the paired per-round step-time ratio, with a 95% bootstrap
    interval over rounds when there are at least 5 (``None`` otherwise)."""
    ratios = np.asarray(rounds) / np.asarray(reference_rounds)
    ci = None
    if len(ratios) >= 5 and np.ptp(ratios) > 0:
        boot = stats.bootstrap(
            (ratios,), np.median, confidence_level=0.95, method="percentile", random_state=0
        )
        ci = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return {
        "step_ratio": float(np.median(ratios)),
        "step_ratio_ci95": ci,
        "round_ratios": [float(x) for x in ratios],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_names(p, "--methods", METHODS)
    p.add_argument("--rank", type=at_least(1), default=8)
    p.add_argument("--dropout", type=probability, default=0.0)
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--seq", type=at_least(2), default=256)
    p.add_argument("--steps", type=at_least(1), default=5, help="timed steps per round")
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--json", default=None, help="write results here (memory keys: MiB)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    add_names(p, "--layouts", LAYOUTS, "unscanned")
    p.add_argument("--vera-rank", type=at_least(1), default=256)
    p.add_argument(
        "--model", default="bench", choices=("bench", "smollm2"),
        help="the bench Llama, or SmolLM2-135M's shape (random weights)",
    )  # fmt: skip
    p.add_argument("--_memory", default=None, choices=METHODS, help=argparse.SUPPRESS)
    return p


def run_child(cmd: list[str]) -> str:
    """Runs ``cmd``; its stdout, or a RuntimeError with the tail of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}; its stderr ends:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def main(argv=None):
    args = parser().parse_args(argv)

    if args._memory:
        print(json.dumps(memory_of(args._memory, args)))
        return

    methods, layouts = args.methods, args.layouts
    runs = {}
    for layout in layouts:
        cfg, model, params, tokens, axes = setup(args, layout == "scanned")
        for m in methods:
            step, state, frozen, n = make_step(
                m, model, params, args.rank, args.dropout, axes=axes, vera_rank=args.vera_rank
            )
            t0 = time.perf_counter()
            compiled = step.lower(state, frozen, tokens, jax.random.key(0)).compile()
            state, loss = compiled(state, frozen, tokens, jax.random.key(0))
            loss.block_until_ready()
            mem = compiled.memory_analysis()
            xla_mb = mem.temp_size_in_bytes + mem.argument_size_in_bytes
            xla_mb = (xla_mb + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
            runs[layout, m] = {"step": compiled, "frozen": frozen, "params": n, "tokens": tokens}
            runs[layout, m].update(compile_s=time.perf_counter() - t0, xla_step_mb=xla_mb)
            state, loss = compiled(state, frozen, tokens, jax.random.key(1))  # warm-up
            runs[layout, m]["state"] = state
            runs[layout, m]["times"], runs[layout, m]["rounds"] = [], []
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: hidden {cfg.hidden_size}, "
        f"FFN {cfg.intermediate_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
        f"batch {args.batch}x{args.seq}, rank {args.rank} (VeRA/DVoRA {args.vera_rank}), "
        f"dropout {args.dropout}"
    )
    for r in range(args.rounds):
        for run in runs.values():  # interleaved: machine noise hits every configuration alike
            state, times = run["state"], []
            for i in range(args.steps):
                t0 = time.perf_counter()
                state, loss = run["step"](
                    state, run["frozen"], run["tokens"], jax.random.key(100 * r + i)
                )
                loss.block_until_ready()
                times.append(time.perf_counter() - t0)
            run["state"] = state
            run["times"] += times
            run["rounds"].append(statistics.median(times))

    results = {}
    for (layout, m), run in runs.items():
        results[f"{layout}/{m}"] = {
            "step_s": statistics.median(run["times"]),
            "trainable_params": run["params"],
            "compile_s": run["compile_s"],
            "xla_step_mb": run["xla_step_mb"],
        }
        ref = runs.get((layout, reference(m)))
        if ref is not None:
            results[f"{layout}/{m}"].update(step_ratio_stats(run["rounds"], ref["rounds"]))
    del runs
    if not args.no_memory:
        for layout in layouts:
            for m in methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--_memory", m]
                cmd += ["--rank", str(args.rank), "--dropout", str(args.dropout)]
                cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
                cmd += ["--layouts", layout, "--vera-rank", str(args.vera_rank)]
                cmd += ["--model", args.model]
                out = run_child(cmd)
                results[f"{layout}/{m}"].update(json.loads(out.strip().splitlines()[-1]))

    header = f"{'layout/method':<20}{'trainable':>12}{'step s':>9}{'ratio':>7}{'95% CI':>14}"
    header += f"{'XLA step MiB':>13}{'ratio':>7}"
    if not args.no_memory:
        header += f"{'RSS MiB':>9}{'ratio':>7}"
    print(header + "   (ratio: to LoRA; DVoRA to VeRA)")
    for name, r in results.items():
        layout, m = name.split("/")
        base = results.get(f"{layout}/{reference(m)}")
        line = f"{name:<20}{r['trainable_params']:>12,}{r['step_s']:>9.3f}"
        line += f"{r['step_ratio']:>7.3f}" if base else f"{'':>7}"
        ci = r.get("step_ratio_ci95")
        line += f"{f'{ci[0]:.3f}-{ci[1]:.3f}':>14}" if ci else f"{'':>14}"
        line += f"{r['xla_step_mb']:>13.1f}"
        line += f"{r['xla_step_mb'] / base['xla_step_mb']:>7.3f}" if base else f"{'':>7}"
        if not args.no_memory:
            line += f"{r['peak_rss_mb']:>9.0f}"
            line += f"{r['peak_rss_mb'] / base['peak_rss_mb']:>7.3f}" if base else f"{'':>7}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
