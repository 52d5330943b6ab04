"""A small, readable Flax Linen Llama (HF Llama conventions).

Every projection is a plain ``nn.Dense(use_bias=False)`` with a 2-D ``(in, out)``
kernel so that parameter-efficient adapters (LoRA/DoRA) can find and wrap them
by name: ``self_attn/{q,k,v,o}_proj`` and ``mlp/{gate,up,down}_proj`` inside
``layers_{i}`` (or a single stacked ``layers`` when ``scan_layers=True``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# The adaptable projections of a decoder layer, by short name: path inside a layer.
PROJECTIONS = {
    "q": "self_attn/q_proj",
    "k": "self_attn/k_proj",
    "v": "self_attn/v_proj",
    "o": "self_attn/o_proj",
    "gate": "mlp/gate_proj",
    "up": "mlp/up_proj",
    "down": "mlp/down_proj",
}


def projection_regex(names=tuple(PROJECTIONS)) -> str:
    """``targets=`` regex for ``dora_jax.wrap`` matching the named projections' kernels.

    Example: ``projection_regex(["q", "v"])`` -> ``"(self_attn/q_proj|self_attn/v_proj)/kernel$"``.
    """
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown projections {unknown}; choose from {sorted(PROJECTIONS)}")
    return "(" + "|".join(PROJECTIONS[n] for n in names) + ")/kernel$"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters of a Llama decoder.

    ``sliding_window`` (a Mistral checkpoint's): transformers attends to the last
    ``sliding_window`` tokens only, so :class:`Llama`, which attends to all, refuses inputs
    longer than that. ``bos_token_id``, ``eos_token_id`` (an int or a tuple of
    them) and ``pad_token_id`` change nothing here: :func:`from_hf` reads them and
    :func:`to_hf` writes them back, for ``generate`` to stop where the source model's does;
    ``None`` where unknown.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    rope_theta: float = 1e5
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    scan_layers: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # as config.json has it; hashable here
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        """Per-head dimension, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @classmethod
    def smollm2_135m(cls, **overrides) -> LlamaConfig:
        """SmolLM2-135M(-Instruct) architecture."""
        base = {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_layers": 30,
            "num_heads": 9,
            "num_kv_heads": 3,
            "rope_theta": 1e5,
            "rms_norm_eps": 1e-5,
            "tie_embeddings": True,
            "max_seq_len": 8192,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A tiny config for unit tests (runs in milliseconds)."""
        base = {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "rope_theta": 1e4,
            "rms_norm_eps": 1e-5,
            "tie_embeddings": True,
            "max_seq_len": 128,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def bench(cls, **overrides) -> LlamaConfig:
        """A mid-sized config for speed benchmarks."""
        base = {
            "vocab_size": 8000,
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 8,
            "rope_theta": 1e4,
            "rms_norm_eps": 1e-5,
            "tie_embeddings": True,
            "max_seq_len": 1024,
        }
        return cls(**{**base, **overrides})


def _dense(x2, features: int, name: str, dtype: Dtype, param_dtype: Dtype):
    """Bias-free projection of activations flattened to 2-D ``(tokens, in)``.

    XLA on CPU computes the weight gradient of a 3-D dot_general much more slowly than
    the equivalent 2-D matmul, and the reshape itself is free. Callers flatten (and cast)
    an input once for all the projections that read it (q, k, v; gate, up), so the
    backward pass keeps one copy of it rather than one per projection (per layer, in a
    scan).
    """
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(stddev=0.02),
        name=name,
    )(x2)


def _flat(x, dtype: Dtype):
    """``x`` as ``(tokens, features)`` in the computation dtype."""
    return x.reshape(-1, x.shape[-1]).astype(dtype)


def _rms_norm(x, scale, eps: float, dtype: Dtype):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # HF casts back to the input dtype before multiplying by the weight.
    return x32.astype(dtype) * scale.astype(dtype)


def _add_rms_norm(x, y, scale, eps: float, dtype: Dtype):
    """``(x + y, rms_norm(x + y))`` for ``y`` a sublayer's flat ``(tokens, features)`` output."""
    s = x + y.reshape(x.shape).astype(x.dtype)
    return s, _rms_norm(s, scale, eps, dtype)


# In a scanned stack the backward pass keeps, for every layer, what each layer's backward
# reads. Rematerialising the residual add and norm makes it keep ``x`` and ``y`` (the
# residual stream before the sublayer and the projection's output) instead of the sum: as
# much memory, but ``y`` is the very array a DoRA projection keeps for its magnitude's
# gradient, so scanned DoRA keeps one array fewer per layer. (``prevent_cse=False``: the
# recomputation sits in the backward scan's body, where XLA cannot merge it with the
# forward pass anyway.) Unscanned, XLA's buffer assignment already shares those arrays
# and rematerialising would only add live buffers, so the plain function is used.
_add_rms_norm_remat = jax.checkpoint(_add_rms_norm, static_argnums=(3, 4), prevent_cse=False)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm; statistics are computed in float32.

    Called as ``norm(x)`` it returns the normalised ``x``; as ``norm(x, add=y)`` it
    returns the residual sum and its norm, ``(x + y, norm(x + y))``, with ``y`` flat
    ``(tokens, features)``; ``remat=True`` rematerialises that (for scanned stacks, see
    ``_add_rms_norm_remat``).
    """

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, add=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if add is None:
            return _rms_norm(x, scale, self.eps, self.dtype)
        add_norm = _add_rms_norm_remat if self.remat else _add_rms_norm
        return add_norm(x, add, scale, self.eps, self.dtype)


def rotary_cos_sin(positions, head_dim: int, theta: float):
    """cos/sin of shape ``positions.shape + (head_dim,)``; HF layout (halves repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # Computed once: without the barrier XLA fuses sin/cos into every consumer, forward
    # and backward, and recomputes them there (on CPU ~40 ms of a 1 s training step).
    return lax.optimization_barrier((jnp.cos(emb), jnp.sin(emb)))


def rotate_half(x):
    """HF Llama rotate_half: ``[x1, x2] -> [-x2, x1]`` over the last axis' halves."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotate ``x`` (batch, seq, heads, head_dim) by cos/sin (batch, seq, head_dim)."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


@jax.custom_vjp
def _softmax(x):
    """Softmax over the last axis with the textbook backward ``p * (g - sum(g * p))``.

    Differentiating ``exp(x - max) / sum`` directly makes XLA materialise a broadcast of
    the normaliser and take extra passes over the (batch, heads, q, k) scores.
    """
    e = jnp.exp(x - lax.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


def _softmax_fwd(x):
    p = _softmax(x)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _causal_attention(q, k, v, mask, dtype):
    """Softmax attention of ``q`` (b, t, nh, hd) over ``k``, ``v`` (b, s, nkv, hd).

    Grouped-query attention without repeating K/V: the ``g = nh // nkv`` query
    heads that share a K/V head are folded into the query-length axis, so both
    products are plain 4-D batched matmuls over (batch, kv_head). XLA on CPU runs
    these about twice as fast, forward and backward, as the equivalent 5-D
    grouped einsum. ``mask`` (b, t, s) is True where a query may attend.
    """
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    # (b, t, nkv, g, hd) -> (b, nkv, g * t, hd); rows ordered (group, position).
    q = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * t, hd)
    k = k.transpose(0, 2, 3, 1)  # (b, nkv, hd, s)
    v = v.transpose(0, 2, 1, 3)  # (b, nkv, s, hd)
    scores = jnp.matmul(q, k, preferred_element_type=jnp.float32)
    rows = jnp.tile(mask, (1, g, 1)) if g > 1 else mask
    scores = jnp.where(rows[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = checkpoint_name(_softmax(scores).astype(dtype), "attention_probs")
    out = jnp.matmul(probs, v)  # (b, nkv, g * t, hd)
    out = out.reshape(b, nkv, g, t, hd).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, nh * hd)


def _rotary_attention(q, k, v, cos, sin, mask, num_heads: int, num_kv_heads: int, dtype):
    """Attention from the flat ``(tokens, features)`` outputs of q, k and v; flat output."""
    b, t = mask.shape[:2]
    q = apply_rotary(q.reshape(b, t, num_heads, -1), cos, sin)
    k = apply_rotary(k.reshape(b, t, num_kv_heads, -1), cos, sin)
    v = v.reshape(b, t, num_kv_heads, -1)
    return _causal_attention(q, k, v, mask, dtype).reshape(b * t, -1)


# For scanned stacks: rematerialised except for the attention probabilities, so that the
# backward pass keeps the projections' outputs and recomputes the head split, rotary
# embedding and transposes from them (elementwise work and copies) instead of keeping the
# rotated, transposed copies: as much memory, but those outputs are the arrays DoRA
# projections keep for their magnitudes' gradients, so scanned DoRA keeps three arrays
# fewer per layer. Unscanned it would add live buffers (as ``_add_rms_norm_remat``).
_rotary_attention_remat = jax.checkpoint(
    _rotary_attention,
    policy=jax.checkpoint_policies.save_only_these_names("attention_probs"),
    static_argnums=(6, 7, 8),
    prevent_cse=False,
)


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings.

    Takes ``x`` (batch, seq, hidden) and returns the output projection flat,
    ``(batch * seq, hidden)``: the decoder layer adds it to the residual stream in its
    add-and-norm. ``remat=True`` (scanned stacks) rematerialises the attention between
    the projections, keeping only the probabilities (see ``_rotary_attention_remat``).
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x2 = _flat(x, self.dtype)
        q = _dense(x2, nh * hd, "q_proj", **kw)
        k = _dense(x2, nkv * hd, "k_proj", **kw)
        v = _dense(x2, nkv * hd, "v_proj", **kw)
        attention = _rotary_attention_remat if self.remat else _rotary_attention
        out = attention(q, k, v, cos, sin, mask, nh, nkv, self.dtype)
        return _dense(out, cfg.hidden_size, "o_proj", **kw)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x2 = _flat(x, self.dtype)
        gate = _dense(x2, cfg.intermediate_size, "gate_proj", **kw)
        up = _dense(x2, cfg.intermediate_size, "up_proj", **kw)
        y = _dense(nn.silu(gate) * up, cfg.hidden_size, "down_proj", **kw)
        return y.reshape(x.shape)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block. With ``scanned=True`` it follows the nn.scan
    carry convention and returns ``(x, None)``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scanned: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        remat = self.scanned
        y = LlamaAttention(cfg, name="self_attn", remat=remat, **kw)(h, cos, sin, mask)
        norm = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", remat=remat, **kw)
        x, h = norm(x, add=y)
        x = x + LlamaMLP(cfg, name="mlp", **kw)(h)
        return (x, None) if self.scanned else x


class Llama(nn.Module):
    """Llama causal LM returning float32 logits of shape (batch, seq, vocab).

    ``attention_mask`` (batch, seq), 1 for real tokens, masks padded keys; or (batch, seq,
    seq), True where query ``t`` may attend key ``s`` (packed sequences); the causal mask is
    always applied. ``positions`` defaults to ``arange(seq)``. ``logits_at`` (batch, k)
    int, optional: return the logits at these positions only, (batch, k, vocab) (a loss
    or a score that reads few positions skips most of the vocabulary projection).
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, logits_at=None):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, t = input_ids.shape
        if cfg.sliding_window is not None and t > cfg.sliding_window:
            raise ValueError(
                f"{t} tokens in a sequence, more than sliding_window={cfg.sliding_window}: "
                f"transformers attends to the last {cfg.sliding_window} tokens only, and "
                f"this Llama computes full causal attention, the same only up to that length. "
                f"Split the input into sequences of at most {cfg.sliding_window} tokens."
            )
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(stddev=0.02),
            name="embed_tokens",
            **kw,
        )
        x = embed(input_ids)

        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
        if attention_mask is not None and attention_mask.ndim == 3:
            mask = mask & attention_mask.astype(bool)
        elif attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        mask = jnp.broadcast_to(mask, (b, t, t))

        if cfg.scan_layers:
            # Params are stacked with a leading layer axis under "layers".
            ScannedLayers = nn.scan(
                LlamaDecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )
            x, _ = ScannedLayers(cfg, scanned=True, name="layers", **kw)(x, cos, sin, mask)
        else:
            for i in range(cfg.num_layers):
                x = LlamaDecoderLayer(cfg, name=f"layers_{i}", **kw)(x, cos, sin, mask)

        x = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(_flat(x, self.dtype), cfg.vocab_size, "lm_head", **kw)
            logits = logits.reshape(*x.shape[:-1], cfg.vocab_size)
        return logits.astype(jnp.float32)


def next_token_loss(logits, tokens, weights=None):
    """Mean cross-entropy of ``tokens[:, i + 1]`` under ``logits[:, i]``, in float32.

    ``weights`` (batch, seq), optional, weighs each target token (``weights[:, 0]`` is
    unused), e.g. 1 on answer tokens and 0 elsewhere; the mean is over the weights' sum.
    Same value as ``log_softmax(logits[:, :-1])`` gathered at ``tokens[:, 1:]``, but never
    copies the (batch, seq, vocab) logits for the shift and has no scatter in its gradient
    (on CPU 47 -> 17 ms of a 1 s step on the bench Llama).
    """
    b, t, v = logits.shape
    f32 = jnp.float32
    labels = jnp.roll(tokens, -1, axis=1)  # the last position wraps around; weight 0
    w = jnp.ones((b, t), f32) if weights is None else jnp.asarray(weights, f32)
    w = jnp.roll(w, -1, axis=1) * (jnp.arange(t) < t - 1)
    logits = logits.astype(f32)
    picked = jnp.sum(jnp.where(jnp.arange(v) == labels[..., None], logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def stack_layer_params(params, num_layers: int):
    """Convert a ``layers_{i}`` params tree into the ``scan_layers=True`` layout."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layer_params(params, num_layers: int):
    """Convert a stacked ``layers`` params tree back into ``layers_{i}`` entries."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


# --- Hugging Face checkpoints ------------------------------------------------------------

_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
_HF_MODEL_TYPES = ("llama", "mistral")
_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def hf_module_name(path: str, index: tuple[int, ...] = ()) -> str | None:
    """The Hugging Face module name of a kernel of :class:`Llama`, or None.

    ``path`` is the ``/``-joined Flax path of the kernel (``layers_3/self_attn/q_proj/kernel``,
    or ``layers/self_attn/q_proj/kernel`` with ``index=(3,)`` for ``scan_layers=True``).

    Example::

      hf_module_name("layers_3/mlp/up_proj/kernel")            # "model.layers.3.mlp.up_proj"
      hf_module_name("layers/mlp/up_proj/kernel", (3,))        # the same kernel, scanned
    """
    parts = path.split("/")
    if parts[-1] != "kernel":
        return None
    if parts[:-1] == ["lm_head"] and not index:
        return "lm_head"
    module = "/".join(parts[1:-1])
    if module not in PROJECTIONS.values():
        return None
    if parts[0] == "layers" and len(index) == 1:
        layer = index[0]
    elif parts[0].startswith("layers_") and parts[0][7:].isdigit() and not index:
        layer = int(parts[0][7:])
    else:
        return None
    return f"model.layers.{layer}.{module.replace('/', '.')}"


def _hf_tensors(config: LlamaConfig):
    """``(flax path, layer or None, hf tensor name, is a kernel)`` for every parameter."""
    yield ("embed_tokens", "embedding"), None, "model.embed_tokens.weight", False
    for i in range(config.num_layers):
        for norm in _LAYER_NORMS:
            yield (norm, "scale"), i, f"model.layers.{i}.{norm}.weight", False
        for proj in PROJECTIONS.values():
            name = f"model.layers.{i}.{proj.replace('/', '.')}.weight"
            yield (*proj.split("/"), "kernel"), i, name, True
    yield ("norm", "scale"), None, "model.norm.weight", False
    if not config.tie_embeddings:
        yield ("lm_head", "kernel"), None, "lm_head.weight", True


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict (Llama family).

    Refuses, naming the option, any setting :class:`Llama` does not compute exactly
    (biases, rope scaling, another activation or head size, a sliding window shorter than
    ``max_position_embeddings``: a window at least that long is full causal attention up
    to it, and :class:`Llama` refuses longer inputs). Absent options take transformers'
    defaults for the model type (a Mistral config without ``sliding_window`` has 4096), the
    token ids included.
    """

    def refuse(option, value, why):
        raise ValueError(
            f"config.json has {option}={value!r}: {why}. dora_jax's Llama does not implement "
            f"it, and loading the weights anyway would compute a different model."
        )

    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        refuse("model_type", model_type, f"only {_HF_MODEL_TYPES} checkpoints are read")
    mistral = model_type == "mistral"
    # transformers' ACT2FN maps "swish" to torch's SiLU: the same function.
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU with silu")
    for option in ("attention_bias", "mlp_bias"):
        if hf.get(option):
            refuse(option, hf[option], "projections have no bias")
    if hf.get("rope_interleaved"):  # SmolLM configs carry this flag
        refuse("rope_interleaved", True, "rotary embeddings rotate halves (HF's rotate_half)")
    max_seq_len = int(hf.get("max_position_embeddings", 131072 if mistral else 2048))
    window = hf.get("sliding_window", 4096 if mistral else None)
    if window is not None and int(window) < max_seq_len:
        refuse(
            "sliding_window", window, f"attention is full causal attention, a sliding "
            f"window's only for inputs of at most {window} tokens, and "
            f"max_position_embeddings={max_seq_len} allows longer ones",
        )  # fmt: skip
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        rope.update(scaling)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        refuse("rope_type", rope_type, "rotary embeddings are unscaled")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e4))
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    if hf.get("head_dim") not in (None, hidden // heads):
        refuse("head_dim", hf["head_dim"], f"head_dim is hidden_size // heads = {hidden // heads}")
    fields = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(hf["intermediate_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "rope_theta": float(theta),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": max_seq_len,
        # transformers' Llama ignores the option; its Mistral attends within the window.
        "sliding_window": int(window) if mistral and window is not None else None,
        # For generate (transformers' defaults for both model types: 1, 2, None).
        "bos_token_id": hf.get("bos_token_id", 1),
        "eos_token_id": hf.get("eos_token_id", 2),
        "pad_token_id": hf.get("pad_token_id"),
    }
    return LlamaConfig(**{**fields, **overrides})


def config_to_hf(config: LlamaConfig, dtype: str = "float32") -> dict:
    """The Hugging Face ``config.json`` dict of a :class:`LlamaConfig`.

    A Llama config, or a Mistral one where the config has a ``sliding_window`` (the same
    weights; transformers then keeps the window). The token ids are written as they are,
    unknown ones (``None``) as null rather than transformers' Llama defaults: set them
    (``dataclasses.replace(config, eos_token_id=...)``) for ``generate`` to stop at EOS.
    """
    eos, mistral = config.eos_token_id, config.sliding_window is not None
    hf = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        # transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
    }
    if mistral:
        hf["sliding_window"] = config.sliding_window
    return hf


def _safetensors_files(directory) -> list:
    """The weight files of a checkpoint directory, in transformers' order of preference:
    ``model.safetensors``, else the files the index json names."""
    import pathlib

    directory = pathlib.Path(directory)
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.exists():
        import json

        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"No *.safetensors weights in {directory} (a pytorch_model.bin checkpoint can be "
            f"converted with transformers: from_pretrained(...).save_pretrained(dir))."
        )
    return found


def from_hf(directory, *, dtype: Dtype | None = None, scan_layers: bool = False):
    """Reads a local Hugging Face Llama-family checkpoint into :class:`Llama` params.

    ``directory`` is what ``save_pretrained`` writes: ``config.json`` and one or several
    ``*.safetensors`` files (with ``model.safetensors.index.json``). Llama, SmolLM2 and
    Mistral-style (no sliding window shorter than the context) configs, grouped-query
    attention, tied or untied embeddings and any rope theta are read; options
    :class:`Llama` does not compute exactly are refused by :func:`config_from_hf`. A tied
    config whose files also hold an ``lm_head.weight`` is read as transformers reads it:
    tied if it equals ``model.embed_tokens.weight``, else untied, with a warning (the
    returned config then has ``tie_embeddings=False``); stored only as ``lm_head.weight``,
    the table is the embedding's too. Tensors are read one at a time with
    ``safetensors.safe_open`` (memory-mapped), transposed from torch's ``(out, in)`` to
    Flax's ``(in, out)``; scanned layers are stacked into one preallocated array per
    parameter, so no file is ever held twice in memory. Never touches the network.

    Args:
      directory: the checkpoint directory.
      dtype: dtype of the returned params (default: as stored in the files).
      scan_layers: return the ``scan_layers=True`` layout (one ``layers`` stack).

    Returns:
      ``(config, params)``: ``Llama(config).apply({"params": params}, tokens)`` runs it.

    Example::

      config, params = from_hf("SmolLM2-135M", dtype=jnp.bfloat16, scan_layers=True)
      logits = Llama(config).apply({"params": params}, tokens)
    """
    import json
    import pathlib

    import numpy as np
    from safetensors import safe_open

    directory = pathlib.Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    config = config_from_hf(hf, scan_layers=scan_layers)
    wanted = {name: (path, layer) for path, layer, name, _ in _hf_tensors(config)}
    kernels = {name for _, _, name, is_kernel in _hf_tensors(config) if is_kernel}
    params: dict = {}
    stacks: dict = {}
    found = set()
    head = None  # a tied config's lm_head.weight, if the files hold one
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                if name not in wanted:
                    if name == "lm_head.weight" and config.tie_embeddings:
                        head = f.get_tensor(name)
                        head = head.astype(dtype) if dtype is not None else head
                        continue
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # older transformers saved the rope buffer
                    raise ValueError(
                        f"{file.name} holds '{name}', which dora_jax's Llama has no place "
                        f"for: this is not a plain Llama checkpoint."
                    )
                x = f.get_tensor(name)
                if name in kernels:
                    x = x.T
                if dtype is not None:
                    x = x.astype(dtype)
                path, layer = wanted[name]
                if layer is None:
                    _set(params, path, jnp.asarray(x))
                elif scan_layers:
                    if path not in stacks:
                        stacks[path] = np.empty((config.num_layers, *x.shape), x.dtype)
                    stacks[path][layer] = x
                else:
                    _set(params, (f"layers_{layer}", *path), jnp.asarray(x))
                found.add(name)
    if head is not None:
        config = _tie_as_transformers(directory, config, params, head, found)
        wanted = {name: path for path, _, name, _ in _hf_tensors(config)}
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(
            f"{directory} lacks {len(missing)} tensor(s) the config asks for, e.g. "
            f"{missing[:3]} (tie_word_embeddings={config.tie_embeddings})."
        )
    for path in list(stacks):
        _set(params, ("layers", *path), jnp.asarray(stacks.pop(path)))
    return config, params


def _tie_as_transformers(directory, config: LlamaConfig, params: dict, head, found: set):
    """What transformers' ``tie_weights`` makes of a tied config whose files hold an
    ``lm_head.weight`` (``head``, as read): the table of both uses if the embedding is
    absent or equal to it; else both are kept, untied. Puts it in ``params``; returns the
    config."""
    import warnings

    import numpy as np

    embed = "model.embed_tokens.weight"
    if embed not in found:
        _set(params, ("embed_tokens", "embedding"), jnp.asarray(head))
        found.add(embed)
        return config
    table = np.asarray(params["embed_tokens"]["embedding"])
    if table.shape != head.shape:
        raise ValueError(
            f"{directory} holds lm_head.weight {head.shape} beside model.embed_tokens.weight "
            f"{table.shape}: not one (vocab, hidden) table, as tie_word_embeddings=true says."
        )
    if np.array_equal(table, head):
        return config  # some writers keep the tied copy
    warnings.warn(
        f"{directory}/config.json has tie_word_embeddings=true, but the checkpoint holds an "
        f"lm_head.weight that differs from model.embed_tokens.weight. transformers does not "
        f"tie them then and uses both as stored; so does from_hf: the returned config has "
        f"tie_embeddings=False and params an lm_head kernel. Set tie_word_embeddings=false "
        f"in config.json to silence this warning.",
        stacklevel=3,
    )
    _set(params, ("lm_head", "kernel"), jnp.asarray(head.T))
    found.add("lm_head.weight")
    return dataclasses.replace(config, tie_embeddings=False)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def to_hf(
    directory, config: LlamaConfig, params, *, dtype: Dtype | None = None,
    max_shard_bytes: int = _SHARD_BYTES,
) -> None:  # fmt: skip
    """Writes :class:`Llama` params as a Hugging Face checkpoint directory.

    Writes ``config.json`` and ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors``
    shards with ``model.safetensors.index.json`` above ``max_shard_bytes``; weight files of
    an earlier export into the same directory are removed, as ``save_pretrained`` does) that
    ``transformers.LlamaForCausalLM.from_pretrained(directory)`` loads. ``params`` are plain
    params, scanned or not (for adapted ones, write ``dora_jax.merge(adapted)``). Kernels are
    transposed to torch's ``(out, in)``; each shard is built and written on its own.
    ``config.json`` carries the config's token ids (see :func:`config_to_hf`), so that
    ``generate`` stops at the EOS that :func:`from_hf` read.

    Args:
      directory: created if missing.
      config: the model's config.
      params: the ``params`` collection of :class:`Llama`.
      dtype: dtype of the written tensors (default: as in ``params``).
      max_shard_bytes: largest shard size (default 5 GiB, as transformers).

    Example::

      to_hf("merged", config, dora_jax.merge(adapted), dtype=jnp.bfloat16)
      # transformers.LlamaForCausalLM.from_pretrained("merged")
    """
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scanned = "layers" in params
    if scanned == any(f"layers_{i}" in params for i in range(config.num_layers)):
        raise ValueError(
            "params must hold either a 'layers' stack (scan_layers=True) or 'layers_{i}' "
            "entries; pass the 'params' collection of one Llama."
        )
    from dora_jax.adapters import is_adapter

    if any(is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter)):
        raise TypeError("params hold adapters: write dora_jax.merge(adapted) instead.")

    def leaf(path, layer):
        if layer is None:
            return _get(params, path)
        return _get(params, ("layers", *path) if scanned else (f"layers_{layer}", *path))

    def tensor(path, layer, is_kernel):
        x = np.asarray(leaf(path, layer))
        x = x[layer] if scanned and layer is not None else x
        x = x.astype(dtype) if dtype is not None else x
        return np.ascontiguousarray(x.T if is_kernel else x)

    entries = list(_hf_tensors(config))
    # Assign shards from shapes alone, then build and write one shard at a time.
    shards, size, total = [[]], 0, 0
    for entry in entries:
        path, layer, _, _ = entry
        x = leaf(path, layer)
        shape = x.shape[1:] if scanned and layer is not None else x.shape
        nbytes = int(np.prod(shape)) * np.dtype(dtype or x.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    out_dtype = str(np.dtype(dtype or _get(params, ("embed_tokens", "embedding")).dtype))
    n = len(shards)

    def file_name(k: int) -> str:
        return "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"

    # Weight files of an earlier export here would be read instead of (or beside) these.
    names = {file_name(k) for k in range(1, n + 1)}
    for old in [*directory.glob("model*.safetensors"), directory / "model.safetensors.index.json"]:
        if old.name not in names and old.exists():
            old.unlink()
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = file_name(k)
        tensors = {name: tensor(path, layer, kern) for path, layer, name, kern in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, out_dtype), indent=2))
