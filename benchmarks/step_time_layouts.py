"""LoRA vs DoRA training-step time on kernels that are not ``(in, out)``: Gemma's einsums, convs.

Two models, each timed for every method in interleaved rounds in one process (machine noise
hits all alike), printing the median step and its ratio to LoRA:

- ``gemma``: a Gemma-style decoder with google-deepmind gemma's parameter layouts and einsum
  strings (``q_einsum`` ``(N, D, H)`` 'BTD,NDH->BTNH', ``kv_einsum`` ``(2, K, D, H)``
  'BSD,CKDH->CBSKH', ``attn_vec_einsum`` ``(N, H, D)``, ``gating_einsum`` ``(2, F, D)``
  '...D,NFD->...NF', ``linear`` ``(F, D)``) and a tied embedding, all five projections
  adapted; axes learned with ``dora_jax.infer_axes``.
- ``conv``: a small conv net (3x3 ``nn.Conv`` layers, two with stride 2, and a dense head),
  every kernel adapted.

Methods: ``lora``, ``dora`` (``dora_jax.apply``, factored) and ``dora_merge`` (``W'`` formed
inside the loss with ``dora_jax.merge``: what a direct port does).

    python benchmarks/step_time_layouts.py
    taskset -c 1 python benchmarks/step_time_layouts.py --rounds 5 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _cli import add_names, at_least

import dora_jax
from dora_jax.models.llama import next_token_loss

METHODS = ("lora", "dora", "dora_merge")
MODELS = ("gemma", "conv")


class Einsum(nn.Module):
    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape)
        return jnp.einsum(eqn, x, w)


class GemmaBlock(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        n, k, h, f = self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_dim
        d = x.shape[-1]
        y = nn.RMSNorm(name="pre_attention_norm")(x)
        q = Einsum((n, d, h), name="q_einsum")("BTD,NDH->BTNH", y)
        key, value = Einsum((2, k, d, h), name="kv_einsum")("BSD,CKDH->CBSKH", y)
        b, t = q.shape[:2]
        q = q.reshape(b, t, k, n // k, h) * h**-0.5
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, key)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, :, None, None, :]
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
        x = x + Einsum((n, h, d), name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)
        y = nn.RMSNorm(name="pre_ffw_norm")(x)
        gate = Einsum((2, f, d), weight_name="gating_einsum", name="mlp")("...D,NFD->...NF", y)
        act = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        return x + Einsum((f, d), weight_name="linear", name="mlp_out")("...F,FD->...D", act)


class GemmaLM(nn.Module):
    vocab: int = 8000
    embed_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    hidden_dim: int = 1408
    num_layers: int = 4

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.embed_dim, name="embedder")
        x = embed(tokens) * jnp.sqrt(self.embed_dim)
        for i in range(self.num_layers):
            x = GemmaBlock(
                self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_dim, name=f"layer_{i}"
            )(x)
        return embed.attend(nn.RMSNorm(name="final_norm")(x))


GEMMA_TARGETS = r"(_einsum/w|gating_einsum|linear)$"


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, (features, stride) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]):
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride, name=f"conv{i}")(x))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def setup(name: str, args):
    """(model function, params, batch, loss of (output, batch), targets, axes)."""
    if name == "gemma":
        model = GemmaLM()
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.vocab)
        params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
        fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
        axes = dora_jax.infer_axes(fn, params, tokens[:, :8])
        return fn, params, tokens, next_token_loss, GEMMA_TARGETS, axes
    model = ConvNet()
    images = jax.random.normal(jax.random.key(1), (args.images, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(2), (args.images,), 0, 10)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    axes = dora_jax.infer_axes(fn, params, images)

    def loss(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return (lambda p, batch: fn(p, batch[0])), params, (images, labels), loss, r"kernel$", axes


def make_step(method, fn, params, loss_of, targets, axes, rank, lr=1e-4):
    adapted = dora_jax.wrap(
        params, rank=rank, method="lora" if method == "lora" else "dora", targets=targets, axes=axes
    )
    frozen, trainable = dora_jax.partition(adapted)
    tx = optax.adamw(lr)
    forward = dora_jax.apply(fn, strict=True)

    def loss(t, frozen, batch):
        p = dora_jax.combine(frozen, t)
        out = fn(dora_jax.merge(p), batch) if method == "dora_merge" else forward(p, batch)
        return loss_of(out, batch)

    # The frozen half is an argument, not a closure: closed-over arrays would be baked into
    # the compiled program as constants.
    def step(state, frozen, batch):
        t, opt = state
        value, g = jax.value_and_grad(loss)(t, frozen, batch)
        updates, opt = tx.update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), value

    return jax.jit(step, donate_argnums=0), (trainable, tx.init(trainable)), frozen


def run(name: str, args) -> dict:
    fn, params, batch, loss_of, targets, axes = setup(name, args)
    runs = {}
    for m in args.methods:
        step, state, frozen = make_step(m, fn, params, loss_of, targets, axes, args.rank)
        t0 = time.perf_counter()
        state, value = step(state, frozen, batch)
        value.block_until_ready()
        compile_s = time.perf_counter() - t0
        state, value = step(state, frozen, batch)  # warm-up
        runs[m] = {
            "step": step,
            "state": state,
            "frozen": frozen,
            "times": [],
            "compile_s": compile_s,
        }
    for _ in range(args.rounds):
        for run_ in runs.values():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run_["state"], value = run_["step"](run_["state"], run_["frozen"], batch)
                value.block_until_ready()
                run_["times"].append(time.perf_counter() - t0)
    return {
        m: {"step_s": statistics.median(r["times"]), "compile_s": r["compile_s"]}
        for m, r in runs.items()
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_names(p, "--models", MODELS)
    add_names(p, "--methods", METHODS)
    p.add_argument("--rank", type=at_least(1), default=8)
    p.add_argument("--batch", type=at_least(1), default=4, help="gemma: sequences per batch")
    p.add_argument("--seq", type=at_least(2), default=256, help="gemma: tokens per sequence")
    p.add_argument("--images", type=at_least(1), default=32, help="conv: images per batch")
    p.add_argument("--steps", type=at_least(1), default=3, help="timed steps per round")
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--json", default=None, help="write results here")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: rank {args.rank}; gemma batch "
        f"{args.batch}x{args.seq}; conv batch {args.images}x32x32x3; medians of "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    results = {}
    for name in args.models:
        results[name] = run(name, args)
        base = results[name].get("lora")
        print(f"{name}:")
        for m, r in results[name].items():
            ratio = f"{r['step_s'] / base['step_s']:7.2f}" if base else ""
            print(f"  {m:<12}{r['step_s']:9.4f} s{ratio}  (compile {r['compile_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
