"""Magnitude and direction updates of full fine-tuning, LoRA and DoRA (DoRA paper, Fig. 2).

Fine-tunes SmolLM2-135M-Instruct on the commonsense training mix (the training halves of
the tasks' validation splits, as the main job) three ways with the same batches and steps:
full fine-tuning (every weight), LoRA and DoRA (rank 8 on q and v). At intermediate
checkpoints and the end it measures, for the q and v kernel of every layer, the magnitude
change ΔM and direction change ΔD against the pre-trained kernel
(``dora_jax.analysis.weight_change``), and fits the correlation and slope of ΔM on ΔD over
all (layer, checkpoint) points, with a 95% bootstrap interval over layers. The paper
reports a positive correlation for LoRA and negative ones for full fine-tuning and DoRA.

    python experiments/decomposition.py            # SmolLM2-135M, ~20 min on a quiet CPU
    python experiments/decomposition.py --tiny     # random tiny Llama (CI)

Writes ``<out>/decomposition.json`` (every point, the fits) and ``<out>/decomposition.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

import dora_jax
from dora_jax import analysis
from dora_jax.experiments import commonsense, training
from dora_jax.models.llama import PROJECTIONS, Llama, projection_regex

METHODS = ("full", "lora", "dora")
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "dora": "DoRA"}
KERNELS = ("q", "v")


# Settings of a full run, and what --tiny fills in of those the command line leaves out.
DEFAULTS = dict(steps=48, batch=8, seq=128, n_boot=2000)
TINY = dict(steps=8, batch=2, seq=64, n_boot=200)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--tasks", default="winogrande,obqa,arc_e",
                   help=f"comma list of {commonsense.ALL_TASKS}")  # fmt: skip
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA/DoRA learning rate")
    p.add_argument("--full-lr", type=float, default=3e-5, help="full fine-tuning learning rate")
    p.add_argument("--steps", type=int, help=f"at least 2 (default {DEFAULTS['steps']})")
    p.add_argument("--checkpoints", type=int, default=4, help="evenly spaced, the last at the end")
    p.add_argument("--batch", type=int, help=f"packed rows per step (default {DEFAULTS['batch']})")
    p.add_argument("--seq", type=int, help=f"row length (default {DEFAULTS['seq']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, help=f"bootstrap resamples (default {DEFAULTS['n_boot']})")
    p.add_argument("--tiny", action="store_true",
                   help=f"random tiny Llama; unless given, {TINY} (CI)")  # fmt: skip
    p.add_argument("--out", default="runs/decomposition")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, k) is None:  # --tiny fills only what the command line left out
            setattr(args, k, v)
    args.methods = training.comma_list(p, "--methods", args.methods, choices=METHODS)
    args.tasks = training.comma_list(p, "--tasks", args.tasks, choices=commonsense.ALL_TASKS)
    training.check_steps(p, args.steps)
    for flag, value in (("--lr", args.lr), ("--full-lr", args.full_lr)):
        training.check_positive(p, flag, value)
    training.check_at_least(p, 1, {"--rank": args.rank, "--batch": args.batch,
                                   "--n-boot": args.n_boot})  # fmt: skip
    training.check_at_least(p, 2, {"--seq": args.seq}, " (a prompt token and an answer token)")
    training.check_at_least(p, 0, {"--seed": args.seed})
    if not 1 <= args.checkpoints <= args.steps:
        p.error("--checkpoints must be between 1 and --steps")
    training.check_out(p, args.out)
    return args


def run_method(method, model, params, axes, batches, args, checkpoint_steps):
    """Trains one method; returns ``{step: {path: (ΔM, ΔD)}}`` for the q and v kernels."""
    targets = projection_regex(KERNELS)
    if method == "full":
        frozen, trainable = None, params
        lr = args.full_lr
    else:
        adapted = dora_jax.wrap(params, rank=args.rank, method=method, targets=targets,
                                axes=axes, key=jax.random.key(args.seed))  # fmt: skip
        frozen, trainable = dora_jax.partition(adapted)
        lr = args.lr
    tx = training.optimizer(lr, args.steps)
    step = training.make_train_step(model.apply, tx, adapted=method != "full")
    changes, losses = {}, []
    bar = tqdm(total=args.steps, desc=method, leave=False)

    def on_step(i, loss, trainable):
        bar.update()
        losses.append(loss)
        if i + 1 in checkpoint_steps:
            tuned = trainable if method == "full" else dora_jax.combine(frozen, trainable)
            changes[i + 1] = analysis.weight_change(params, tuned, targets=targets, axes=axes)

    training.run_steps(step, trainable, tx.init(trainable), frozen, batches, args.steps,
                       jax.random.key(args.seed), on_step=on_step)  # fmt: skip
    bar.close()
    return changes, losses


def fits_of(changes, num_layers, n_boot):
    """Per kernel (q, v) and both together: the fit over all (layer, checkpoint) points,
    with its bootstrap interval over layers."""
    out = {}
    for name in (*KERNELS, "q+v"):
        kernels = KERNELS if name == "q+v" else (name,)
        groups = []
        for layer in range(num_layers):
            for k in kernels:
                path = f"layers/{PROJECTIONS[k]}/kernel[{layer}]"
                groups.append([c[path] for c in changes.values()])
        out[name] = analysis.fit_line_ci(groups, n_boot=n_boot)
    return out


def fits_by_checkpoint(changes, num_layers):
    """Per checkpoint and kernel: the fit across layers only. Pooled over checkpoints, ΔM
    and ΔD both grow with training, which pushes the pooled correlation up whatever the
    method; within one checkpoint that common growth is absent."""
    return {
        str(step): {
            k: analysis.fit_line([c[f"layers/{PROJECTIONS[k]}/kernel[{i}]"]
                                  for i in range(num_layers)])
            for k in KERNELS
        }
        for step, c in changes.items()
    }  # fmt: skip


def plot(all_changes, fits, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(all_changes)
    fig, axes = plt.subplots(len(KERNELS), len(methods), figsize=(3.6 * len(methods), 6.4),
                             squeeze=False)  # fmt: skip
    for j, method in enumerate(methods):
        for i, k in enumerate(KERNELS):
            proj = f"{k}_proj/"
            per_step = {f"step {s}": {p: v for p, v in c.items() if proj in p}
                        for s, c in all_changes[method].items()}  # fmt: skip
            analysis.plot_weight_change(per_step, axes[i, j])
            f = fits[method][k]
            axes[i, j].set_title(
                f"{LABELS[method]}, {k}: r = {f['correlation']:.2f} "
                f"[{f['correlation_low']:.2f}, {f['correlation_high']:.2f}]",
                fontsize=8,
            )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create the output folder ({e}).") from None
    t_start = time.perf_counter()
    config, params, tokenizer = training.load_llama(args.tiny, scan_layers=True)
    model = Llama(config)
    train, _ = commonsense.train_and_held_out(args.tasks, train_limit=32 if args.tiny else None)
    axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params,
                               jnp.zeros((1, 8), jnp.int32))  # fmt: skip
    every = args.steps / args.checkpoints
    checkpoint_steps = sorted({round(every * (i + 1)) for i in range(args.checkpoints)})
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    print(f"{len(train)} training examples ({','.join(args.tasks)}); {args.steps} steps of "
          f"{args.batch} packed rows x {args.seq}; checkpoints at {checkpoint_steps}",
          flush=True)  # fmt: skip

    all_changes, fits, losses, per_checkpoint = {}, {}, {}, {}
    for method in args.methods:
        # The same batches for every method.
        batches = commonsense.training_batches(train, tokenizer, args.batch, args.seq,
                                               seed=args.seed, pad_id=pad_id)  # fmt: skip
        t0 = time.perf_counter()
        changes, losses[method] = run_method(method, model, params, axes, batches, args,
                                             checkpoint_steps)  # fmt: skip
        all_changes[method] = changes
        fits[method] = fits_of(changes, config.num_layers, args.n_boot)
        per_checkpoint[method] = fits_by_checkpoint(changes, config.num_layers)
        f = fits[method]
        tqdm.write(
            f"{LABELS[method]}: loss {losses[method][0]:.3f} -> {losses[method][-1]:.3f} "
            f"({time.perf_counter() - t0:.0f} s); "
            + "; ".join(
                f"{k} r = {f[k]['correlation']:+.2f} [{f[k]['correlation_low']:+.2f}, "
                f"{f[k]['correlation_high']:+.2f}], slope {f[k]['slope']:+.3g}"
                for k in (*KERNELS, "q+v")
            )
            + "; within checkpoints: "
            + ", ".join(
                f"step {step} q {v['q']['correlation']:+.2f} v {v['v']['correlation']:+.2f}"
                for step, v in per_checkpoint[method].items()
            )
        )

    minutes = (time.perf_counter() - t_start) / 60
    title = (
        f"SmolLM2-135M{' (tiny random stand-in)' if args.tiny else ''}: ΔM vs ΔD of q/v "
        f"kernels, {args.steps} steps, checkpoints {checkpoint_steps}; r with 95% "
        f"bootstrap CI over layers; {minutes:.1f} min on {jax.devices()[0].platform}"
    )
    lines = ["| method | kernel | correlation | 95% CI (layers) | slope | 95% CI |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, f in fits.items():
        for k, v in f.items():
            lines.append(
                f"| {LABELS[method]} | {k} | {v['correlation']:+.2f} | "
                f"[{v['correlation_low']:+.2f}, {v['correlation_high']:+.2f}] | "
                f"{v['slope']:+.3g} | [{v['slope_low']:+.3g}, {v['slope_high']:+.3g}] |"
            )
    md = "\n".join(lines)
    print("\n" + md + "\n\n" + title)
    (out / "decomposition.md").write_text(md + "\n\n" + title + "\n")
    (out / "decomposition.json").write_text(json.dumps({
        "settings": vars(args),
        "checkpoint_steps": checkpoint_steps,
        "fits": fits,
        "fits_by_checkpoint": per_checkpoint,
        "losses": losses,
        "points": {m: {str(s): c for s, c in ch.items()} for m, ch in all_changes.items()},
        "minutes": minutes,
    }, indent=1))  # fmt: skip
    plot(all_changes, fits, out / "decomposition.png", title)
    print(f"wrote {out}/decomposition.json, decomposition.md, decomposition.png")


if __name__ == "__main__":
    main()
