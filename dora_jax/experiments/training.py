"""One train-step builder and one evaluation builder, shared by every script, and the
command-line checks the scripts share (``comma_list``, ``check_steps``, ``check_positive``,
``check_out``: an argparse error before a run, not a traceback after one).

A model is given as its Linen-style ``apply_fn(variables, tokens, **kwargs) -> logits``
(``Llama(config).apply``). Batches are dicts of arrays: a packed batch from
:func:`dora_jax.experiments.commonsense.training_batches` (``tokens``, ``positions``,
``segments``, ``branches``, ``sources``, ``targets``, ``weights``), or ``{"tokens"}`` with an
optional ``loss_mask`` (plain next-token loss over the row, e.g. random benchmark tokens).

Example::

    tx = optimizer(1e-3, steps=100)
    frozen, trainable = dora_jax.partition(adapted)
    step = make_train_step(model.apply, tx)
    trainable, opt_state, loss = step(trainable, tx.init(trainable), frozen, batch, key)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dora_jax
from dora_jax.experiments.commonsense import MCResult, packed_attention_mask
from dora_jax.models.llama import next_token_loss

PyTree = Any


def load_llama(tiny: bool = False, *, scan_layers: bool = True):
    """``(config, params, tokenizer)``: SmolLM2-135M-Instruct from the packaged GGUF (float32),
    or with ``tiny`` a random tiny Llama with SmolLM2's tokenizer (what CI runs)."""
    from dora_jax.models import smollm2
    from dora_jax.models.llama import Llama, LlamaConfig

    if not tiny:
        config, variables, tokenizer = smollm2.load_smollm2(scan_layers=scan_layers)
        return config, variables["params"], tokenizer
    import gguf

    tokenizer = smollm2.tokenizer_from_gguf(gguf.GGUFReader(str(smollm2.find_gguf())))
    config = LlamaConfig.tiny(vocab_size=tokenizer.get_vocab_size(), scan_layers=scan_layers)
    params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return config, params, tokenizer


# Fewest steps of :func:`optimizer`'s schedule that train: its first step has learning rate 0.
MIN_STEPS = 2


def optimizer(lr: float, steps: int, *, warmup: int | None = None) -> optax.GradientTransformation:
    """AdamW (no weight decay) with linear warm-up (default ``steps // 10``, at least 1) and
    cosine decay to ``lr / 10``: the schedule every experiment uses.

    The warm-up starts at learning rate 0, so the first step changes nothing: a run needs
    ``steps >= 2`` to train at all (:data:`MIN_STEPS`; scripts refuse fewer).
    """
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    return optax.adamw(schedule, weight_decay=0.0)


def batch_logits(apply_fn: Callable, variables: PyTree, batch: Mapping[str, jax.Array]):
    """Logits for a batch: at ``batch["sources"]`` of a packed batch, else everywhere."""
    if "sources" not in batch:
        return apply_fn(variables, batch["tokens"])
    mask = packed_attention_mask(batch["segments"], batch["branches"])
    return apply_fn(
        variables,
        batch["tokens"],
        attention_mask=mask,
        positions=batch["positions"],
        logits_at=batch["sources"],
    )


def lm_loss(apply_fn: Callable, variables: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean cross-entropy: of the weighted targets of a packed batch, or next-token over the
    rows of ``{"tokens", "loss_mask"?}``."""
    logits = batch_logits(apply_fn, variables, batch)
    if "sources" not in batch:
        return next_token_loss(logits, batch["tokens"], batch.get("loss_mask"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    adapted: bool = True,
    dropout: bool = False,
    loss: Callable = lm_loss,
    jit: bool = True,
    **jit_kwargs,
) -> Callable:
    """``step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, loss)``.

    Args:
      apply_fn: ``apply_fn(variables, tokens, **kwargs) -> logits``, e.g. ``model.apply``.
      tx: the optax optimiser (state from ``tx.init(trainable)``).
      adapted: ``trainable``/``frozen`` are the halves of :func:`dora_jax.partition` and the
        forward is :func:`dora_jax.apply` (factored, no weight gradient of the base).
        ``False``: full fine-tuning, ``trainable`` is the whole params tree, ``frozen`` is
        ignored (pass ``None``).
      dropout: pass ``key`` to :func:`dora_jax.apply` (adapter dropout is active).
      loss: ``loss(apply_fn, variables, batch) -> scalar`` (default :func:`lm_loss`).
      jit: compile the step with ``jax.jit(**jit_kwargs)`` (e.g. shardings).
    """

    def loss_of(trainable, frozen, batch, key):
        if not adapted:
            return loss(apply_fn, {"params": trainable}, batch)
        fn = dora_jax.apply(apply_fn, key=key if dropout else None)
        return loss(fn, {"params": dora_jax.combine(frozen, trainable)}, batch)

    def step(trainable, opt_state, frozen, batch, key):
        value, grads = jax.value_and_grad(loss_of)(trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(step, **jit_kwargs) if jit else step


def run_steps(
    step: Callable,
    trainable: PyTree,
    opt_state: PyTree,
    frozen: PyTree,
    batches: Iterator[Mapping[str, Any]],
    steps: int,
    key: jax.Array,
    *,
    on_step: Callable[[int, float, PyTree], None] | None = None,
) -> tuple[PyTree, PyTree, list[float], list[float], int]:
    """Runs ``steps`` steps (step ``i`` gets ``fold_in(key, i)``); calls
    ``on_step(i, loss, trainable)`` after each. Returns ``(trainable, opt_state, losses,
    seconds per step, tokens trained)`` (tokens: non-padding, from ``segments`` when the
    batch has them)."""
    losses, times, tokens = [], [], 0
    for i in range(steps):
        batch = next(batches)
        t0 = time.perf_counter()
        trainable, opt_state, loss = step(
            trainable, opt_state, frozen, batch, jax.random.fold_in(key, i)
        )
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        seg = batch.get("segments")
        tokens += int((seg > 0).sum()) if seg is not None else int(batch["tokens"].size)
        if on_step is not None:
            on_step(i, loss, trainable)
    return trainable, opt_state, losses, times, tokens


def make_logprob_fn(apply_fn: Callable) -> Callable:
    """``logprob(params, batch) -> (B, K)``: log p(``targets``) under the logits at
    ``sources`` (jitted; params are an argument, so one compilation serves every params
    tree of the same structure). Pass plain params (merge adapters first: the merged model
    runs as fast as the base)."""

    def logprob(params, batch):
        logits = batch_logits(apply_fn, {"params": params}, batch).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    return jax.jit(logprob)


def evaluate(
    logprob_fn: Callable,
    params: PyTree,
    held_out: Mapping[str, Sequence],
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int = 0,
    packed: bool = True,
) -> dict[str, MCResult]:
    """Scores every task's held-out examples: ``{task: MCResult}``.

    ``logprob_fn`` from :func:`make_logprob_fn`; ``params`` plain or adapted (adapters are
    merged first with :func:`dora_jax.merge`).
    """
    from dora_jax.experiments import commonsense

    merged = dora_jax.merge(params)
    return {
        task: commonsense.score_multiple_choice(
            lambda batch: logprob_fn(merged, batch),
            examples,
            tokenizer,
            batch_size=batch_size,
            seq_len=seq_len,
            task=task,
            progress=False,
            pad_id=pad_id,
            packed=packed,
        )
        for task, examples in held_out.items()
    }


# --- command-line checks shared by the scripts ---------------------------------------------


def comma_list(parser, flag: str, text, *, kind: Callable = str, choices=None) -> list:
    """The entries of a comma-separated flag, each converted by ``kind``.

    Calls ``parser.error`` (an argparse error, exit status 2) on an empty, malformed, unknown
    (not in ``choices``) or repeated entry: a repeated seed, task or method would be counted
    as an independent one.

    Example::

        args.seeds = comma_list(parser, "--seeds", args.seeds, kind=int)
    """
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            parser.error(f"{flag} {text!r}: an empty entry; pass a comma list without blanks")
        try:
            value = kind(item)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            parser.error(f"{flag}: {item!r} is not {what}; pass a comma list of them")
        if choices is not None and value not in choices:
            parser.error(f"unknown {flag.removeprefix('--').removesuffix('s')} {item!r} in "
                         f"{flag}; choose from {tuple(choices)}")  # fmt: skip
        if value in values:
            parser.error(f"{flag} names {item!r} twice; list each once")
        values.append(value)
    return values


def check_steps(parser, steps: int, flag: str = "--steps") -> None:
    """``parser.error`` unless ``steps`` is at least :data:`MIN_STEPS`: the first step of
    :func:`optimizer`'s warm-up has learning rate 0, so fewer steps train nothing."""
    if steps < MIN_STEPS:
        parser.error(f"{flag} {steps}: the first step of the warm-up has learning rate 0, so a "
                     f"run of fewer than {MIN_STEPS} steps trains nothing; pass {flag} >= "
                     f"{MIN_STEPS}")  # fmt: skip


def check_at_least(parser, low: int, values: Mapping[str, int], why: str = "") -> None:
    """``parser.error`` for the first ``{flag: value}`` below ``low`` (``why`` says why)."""
    for flag, value in values.items():
        if value < low:
            parser.error(f"{flag} {value}: pass {flag} >= {low}{why}")


def check_positive(parser, flag: str, value: float) -> None:
    """``parser.error`` unless ``value`` is a positive finite number (a learning rate)."""
    if not 0 < value < math.inf:
        parser.error(f"{flag} {value}: must be a positive number")


def check_out(parser, out: str, flag: str = "--out") -> None:
    """``parser.error`` when the output folder ``out``, or a folder above it, is a file."""
    for path in (Path(out), *Path(out).parents):
        if path.exists():
            if not path.is_dir():
                parser.error(f"{flag} {out}: {path} is a file, not a folder; pass a folder path "
                             "(created if missing)")  # fmt: skip
            return
