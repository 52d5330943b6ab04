"""Hugging Face PEFT adapter files in and out: ``save`` and ``load``.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module>.<tensor>``, in torch's ``(out, in)`` layout:

- LoRA: ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)``; ``dW = s B A`` with
  ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module ``r`` and alpha
  from ``rank_pattern`` / ``alpha_pattern``;
- DoRA: the same with ``use_dora: true`` and ``lora_magnitude_vector (out,)``;
- an embedding table ``(vocab, features)`` (PEFT's ``lora.Embedding``): ``lora_embedding_A
  (r, vocab)``, ``lora_embedding_B (features, r)`` (DoRA: ``lora_magnitude_vector
  (features,)``, the norm over the vocabulary), the vocabulary being its input axis;
- VeRA: ``vera_lambda_b (out,)``, ``vera_lambda_d (r,)`` per module and the shared
  ``base_model.vera_A (r, in_max)``, ``base_model.vera_B (out_max, r)``
  (``save_projection: true``).

dora_jax's leaves are the same numbers in Flax's layout (``a (*in, r) = lora_A.T``,
``b (r, *out) = lora_B.T``, ``magnitude = lora_magnitude_vector``, ``shared_a = vera_A.T``,
``shared_b = vera_B.T``, ``d = vera_lambda_d``, VeRA's ``b = vera_lambda_b``), so a file
moves between the two libraries without any change to the function it computes. Scanned
stacks are written one module per layer, as PEFT names them.

DVoRA (DoRA over VeRA) has no PEFT implementation. :func:`save` writes it in VeRA's
layout plus ``lora_magnitude_vector`` with ``peft_type: "DVORA"`` and a
``dora_jax_extension`` field, so that PEFT refuses the directory instead of loading it as
VeRA; :func:`load` refuses it too (restore DVoRA with :mod:`dora_jax.checkpoint`).

Module names: a ``name_map(path, index) -> str | None`` gives the Hugging Face module name
(``"model.layers.3.self_attn.q_proj"``) of the kernel at the ``/``-joined Flax ``path`` and
stack ``index`` (``()`` for an unstacked kernel, ``(3,)`` for layer 3 of a scanned stack),
or None for kernels with no counterpart. The default is the project's Llama
(:func:`dora_jax.models.llama.hf_module_name`); pass your own for other models. Kernels
with several input or output axes are flattened in C order to torch's ``(out, in)``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.adapters import DoRA, DVoRA, LoRA, VeRA, is_adapter, to_kernel_layout
from dora_jax.tree import Axes, _resolve_axes, _wrap, check_no_node_dicts, path_str

PyTree = Any
NameMap = Callable[[str, tuple], "str | None"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json options that only describe or initialise the adapter: they do not
# change the function a saved adapter computes.
_METADATA = {
    "peft_type", "peft_version", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "auto_mapping", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern",
}  # fmt: skip
_LORA_HANDLED = {
    "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "ensure_weight_tying",  # checked against the model's tying where an embedding is adapted
    "bias",  # checked against the file's tensors
}  # fmt: skip
_LORA_INIT_ONLY = {
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "megatron_core",
}  # fmt: skip
_VERA_HANDLED = {"r", "save_projection", "bias"}
_VERA_INIT_ONLY = {"vera_dropout", "d_initial", "init_weights", "projection_prng_key"}
# Options whose PEFT default is the only value dora_jax computes exactly. ("bias" other than
# "none" only makes PEFT save and load the base's biases: checked against the file in load.)
_MUST_BE_DEFAULT = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
}
# init_lora_weights values that initialise only A and B (PiSSA, OLoRA, LoftQ, CorDA and
# LoRA-GA also rewrite the base weights, so their adapters need that rewritten base). MiCA
# sets B from the base's minor singular vectors and A = 0, leaves the base as it is and
# computes plain LoRA (PEFT's MiCALinearVariant/MiCAEmbeddingVariant); only its training
# differs (B frozen), which dora_jax leaves to the user (partition out b).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


class PeftFormatError(ValueError):
    """An adapter directory or config dora_jax cannot read or write exactly."""


def _llama_name_map() -> NameMap:
    from dora_jax.models.llama import hf_module_name

    def name_map(path: str, index: tuple) -> str | None:
        if path == "embed_tokens/embedding" and not index:
            return "model.embed_tokens"  # an embedding table: PEFT's lora.Embedding
        return hf_module_name(path, index)

    return name_map


def _llama_tied(leaves) -> dict[str, str]:
    """The project's Llama ties ``lm_head`` to ``embed_tokens`` when it has no ``lm_head``
    kernel: its logits are ``h @ embedding.T`` (``attend``)."""
    if "embed_tokens/embedding" in leaves and "lm_head/kernel" not in leaves:
        return {"model.embed_tokens": "lm_head"}
    return {}


def _is_table(path: str, embeddings) -> bool:
    """Whether the kernel at ``path`` is an embedding table the model looks up: a leaf named
    ``embedding`` (Flax ``nn.Embed``/``nnx.Embed``) or one ``embeddings`` names."""
    patterns = [embeddings] if isinstance(embeddings, str) else list(embeddings or ())
    return path.rsplit("/", 1)[-1] == "embedding" or any(re.search(e, path) for e in patterns)


def _llama_axes(path: str, leaf) -> Axes | None:
    # The project's Llama: scanned kernels (layers, in, out) under "layers/".
    if path.startswith("layers/") and leaf.ndim == 3:
        return Axes(1, 1)
    return None


# --- save ---------------------------------------------------------------------------------


def save(
    directory,
    adapted: PyTree,
    *,
    name_map: NameMap | None = None,
    embeddings: str | Sequence[str] = (),
    tied: Mapping[str, str] | None = None,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes ``adapted``'s adapters as a PEFT adapter directory.

    LoRA and DoRA become a PEFT ``LoraConfig`` (DoRA with ``use_dora: true``), VeRA a
    ``VeraConfig`` with the shared matrices saved; ranks and alphas that differ between
    kernels (``wrap(rules=...)``) become ``rank_pattern`` / ``alpha_pattern``. PEFT's
    ``PeftModel.from_pretrained(base, directory)`` then computes the same function.
    Refused: trees that mix LoRA and DoRA or VeRA (PEFT has one ``use_dora`` and one
    method per adapter: save the parts as separate adapters), magnitude-only nodes (no PEFT
    format). DVoRA is written with ``peft_type: "DVORA"`` and a ``dora_jax_extension``
    field (see the module docstring): PEFT cannot load it, by design.

    Embedding tables (a kernel the model looks up, ``W0[ids]``) are written in PEFT's
    ``lora.Embedding`` format, ``lora_embedding_A (r, vocab)`` and ``lora_embedding_B
    (features, r)`` (DoRA: ``lora_magnitude_vector (features,)``, the norm over the
    vocabulary, as dora_jax's). A table the model also uses transposed as its output layer
    (a tied ``lm_head``, ``attend``) is written for LoRA with ``ensure_weight_tying: true``
    and the output layer's tensors, so that PEFT's tied ``lm_head`` sees the same update;
    a tied DoRA table is refused (PEFT gives the tied ``lm_head`` a magnitude of its own,
    one per vocabulary row, which computes something else), as are VeRA tables (PEFT's VeRA
    has no embedding layer).

    Args:
      directory: created if missing. On several processes (a pod), every process calls
        ``save`` (the adapters are gathered from all of them) and process 0 writes.
      adapted: a tree from :func:`dora_jax.wrap` (trained or not).
      name_map: ``(path, index) -> module name`` (default: the project's Llama, whose
        ``embed_tokens/embedding`` is ``model.embed_tokens``). It is called with each
        adapted kernel's own stack indices. With a ``name_map``, ``target_modules`` lists
        the adapted modules by full name (PEFT matches a name or a ``.``-suffix of one, and
        only the project's Llama's modules are all known to dora_jax).
      embeddings: regex (or regexes) searched in the ``/``-joined path of adapted kernels
        that are embedding tables looked up by the model, besides the leaves named
        ``embedding`` (Flax's ``nn.Embed``), which are always taken as tables; e.g.
        ``r"wte/weight$"`` for an Equinox ``Embedding``. A table saved as a linear layer
        would be ignored by PEFT's ``lora.Embedding``, so say which they are.
      tied: ``{embedding module: output module}`` for adapted embedding tables that the
        model also uses transposed as its output layer (``tie_word_embeddings``), e.g.
        ``{"transformer.wte": "lm_head"}``, ``{}`` when none is. Required with a
        ``name_map`` when an embedding table is adapted; the project's Llama says it
        itself (tied when ``params`` have no ``lm_head`` kernel).
      use_rslora: write ``use_rslora: true`` with ``lora_alpha = s * sqrt(r)`` instead of
        ``lora_alpha = s * r``; the same scale ``s`` either way (set it when the adapter
        was wrapped with ``rslora=True``, so PEFT trains it on as rsLoRA).
      fan_in_fan_out: written to the config as given; set it for a base whose weights are
        stored ``(in, out)`` (GPT-2's ``Conv1D``), where PEFT warns and sets it itself
        otherwise. The tensors are the same either way (``lora_A (r, in)``, ``lora_B
        (out, r)``).
      base_model_name_or_path, task_type: written to the config as given (e.g. a hub id
        and ``"CAUSAL_LM"`` for ``AutoPeftModelForCausalLM``).

    Example::

      dora_jax.peft.save("adapter", adapted)
      # peft.PeftModel.from_pretrained(transformers_model, "adapter")
    """
    from safetensors.numpy import save_file

    builtin = name_map is None  # the project's Llama
    name_map = name_map or _llama_name_map()
    flat = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
    nodes = [(path_str(p), x) for p, x in flat if is_adapter(x)]
    if not nodes:
        check_no_node_dicts(adapted, "peft.save")  # restored without a target?
        raise PeftFormatError("adapted holds no adapter nodes; wrap params first.")
    kinds = sorted({type(x).__name__ for _, x in nodes})
    if len(kinds) > 1:
        raise PeftFormatError(
            f"adapted mixes {kinds}: a PEFT adapter has one method (and one use_dora for "
            f"all modules). Save each part as its own adapter, e.g. by wrapping with "
            f"targets= per method, and load them with PeftModel.load_adapter."
        )
    kind = type(nodes[0][1])
    if kind not in (LoRA, DoRA, VeRA, DVoRA):
        raise PeftFormatError(
            f"{kind.__name__} adapters have no PEFT format (PEFT has LoRA, DoRA and VeRA); "
            f"save them with dora_jax.checkpoint."
        )
    tables = {path for path, _ in nodes if _is_table(path, embeddings)}
    for path, node in nodes:
        if path not in tables:
            continue
        if kind not in (LoRA, DoRA):
            raise PeftFormatError(
                f"'{path}' is an embedding table with a {kind.__name__} adapter: PEFT's "
                f"{'VeRA' if kind is VeRA else 'DVoRA'} has no embedding layer. Leave it "
                f"out with wrap(targets=...)."
            )
        if len(node.in_shape) != 1:
            raise PeftFormatError(
                f"'{path}' is taken as an embedding table but has input axes {node.in_shape} "
                f"(a table is looked up by one vocabulary axis): check embeddings= and axes=."
            )
    if tables and tied is None:
        if not builtin:
            raise PeftFormatError(
                f"the embedding tables {sorted(tables)[:4]} are adapted: say whether the "
                f"model also uses one transposed as its output layer (tie_word_embeddings), "
                f"which changes what PEFT computes: tied={{'<embedding module>': 'lm_head'}} "
                f"if so, tied={{}} if not."
            )
        tied = _llama_tied({path_str(p) for p, _ in flat})
    tied = dict(tied or {})
    quantised = [path for path, x in nodes if x.quantised]
    if quantised:
        formats = sorted({getattr(x.base, "format", type(x.base).__name__) for _, x in nodes
                          if x.quantised})  # fmt: skip
        warnings.warn(
            f"{len(quantised)} of the {len(nodes)} adapted kernels (e.g. '{quantised[0]}') "
            f"have a quantised base ({', '.join(formats)}): this adapter was trained on the "
            f"dequantised kernels, which adapter_config.json cannot record. Loaded by PEFT "
            f"onto the float base model, its logits differ from dora_jax's by about the "
            f"quantisation error (a DoRA magnitude holds the dequantised kernel's norms, so "
            f"even an untrained adapter is not the identity there). To match, load it onto "
            f"the same quantised base (dora_jax.peft.load, then dora_jax.quantize_base with "
            f"the same format and block, or the same kernels, and keep_magnitudes=True), or "
            f"deploy "
            f"dora_jax.merge(adapted) instead.",
            UserWarning,
            stacklevel=2,
        )

    tensors: dict[str, np.ndarray] = {}
    modules: list[tuple[str, Any]] = []  # (module name, node) per written module
    for path, node in nodes:
        n_in, n_out = math.prod(node.in_shape), math.prod(node.out_shape)
        # Host copies once per node: slicing device arrays layer by layer dispatches (and
        # compiles) one op per slice.
        host = {f: _gathered(getattr(node, f)) for f in ("a", "b", "d", "magnitude")
                if hasattr(node, f)}  # fmt: skip
        for index in np.ndindex(*node.stack_shape):
            name = name_map(path, tuple(int(i) for i in index))
            if name is None:
                raise PeftFormatError(
                    f"name_map gives no Hugging Face module name for the adapted kernel "
                    f"'{path}' (stack index {index}); pass a name_map that covers it."
                )
            key = PREFIX + name
            if kind in (LoRA, DoRA):
                # PEFT's Linear and Embedding hold the same (r, in) and (out, r) matrices.
                a = np.ascontiguousarray(host["a"][index].reshape(n_in, -1).T)
                b = np.ascontiguousarray(host["b"][index].reshape(-1, n_out).T)
                table = path in tables
                tensors[key + (".lora_embedding_A" if table else ".lora_A.weight")] = a
                tensors[key + (".lora_embedding_B" if table else ".lora_B.weight")] = b
                if table and name in tied:
                    if kind is DoRA or node.stack_shape:
                        raise PeftFormatError(
                            f"'{path}' ('{name}') is a DoRA embedding table that the model "
                            f"also uses as its output layer '{tied[name]}' (tied): dora_jax "
                            f"scales the shared table per feature (norm over the vocabulary) "
                            f"in both uses, while PEFT gives the tied '{tied[name]}' a "
                            f"magnitude of its own, one per vocabulary row, so PEFT would "
                            f"compute other logits. Adapt the table with LoRA, leave it out "
                            f"(wrap(targets=...)), or untie the model."
                            if kind is DoRA
                            else f"'{path}' ('{name}') is a stacked embedding table tied to "
                            f"'{tied[name]}': PEFT ties one table to one output layer."
                        )
                    # ensure_weight_tying: PEFT's tied Linear holds the table's B^T and A^T,
                    # so its update is the table's, transposed.
                    output = PREFIX + tied[name]
                    tensors[output + ".lora_A.weight"] = np.ascontiguousarray(b.T)
                    tensors[output + ".lora_B.weight"] = np.ascontiguousarray(a.T)
                    modules.append((tied[name], node))
            else:
                tensors[key + ".vera_lambda_b"] = host["b"][index].reshape(n_out)
                tensors[key + ".vera_lambda_d"] = host["d"][index]
            if kind in (DoRA, DVoRA):
                magnitude = host["magnitude"][index].reshape(n_out)
                tensors[key + ".lora_magnitude_vector"] = magnitude
            modules.append((name, node))
    if len({name for name, _ in modules}) != len(modules):
        raise PeftFormatError("name_map gives two adapted kernels the same module name.")

    if kind in (LoRA, DoRA):
        config = _lora_config(modules, kind is DoRA, use_rslora)
        if any(name in tied for name, _ in modules):  # an output layer tied to a table
            config["ensure_weight_tying"] = True
    else:
        shared_a, shared_b = nodes[0][1].shared_a, nodes[0][1].shared_b
        tensors["base_model.vera_A"] = np.ascontiguousarray(_gathered(shared_a).T)
        tensors["base_model.vera_B"] = np.ascontiguousarray(_gathered(shared_b).T)
        config = _vera_config(modules, shared_a.shape[-1])
        if kind is DVoRA:
            config["peft_type"] = "DVORA"
            config["dora_jax_extension"] = {
                "method": "dvora",
                "formula": "W' = m (W0 + dW) / ||W0 + dW||_c, dW = VeRA's update",
                "note": "DVoRA (DoRA over VeRA) has no PEFT implementation; these files "
                "keep VeRA's layout plus lora_magnitude_vector and are read by dora_jax "
                "only.",
            }
    config["fan_in_fan_out"] = bool(fan_in_fan_out)
    names = [n for n, _ in modules]
    config["target_modules"] = _compact_names(names, flat, name_map) if builtin else sorted(names)
    config["base_model_name_or_path"] = base_model_name_or_path
    config["task_type"] = task_type

    if jax.process_index() != 0:
        return  # every process gathered the arrays above; one writes them
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def _gathered(x) -> np.ndarray:
    """``x`` on the host, whole: an array split across processes is gathered first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _number(x: float) -> float | int:
    """``x`` as an int when it is one up to float rounding (``lora_alpha`` is an int in PEFT)."""
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else x


def _lora_config(modules, use_dora: bool, use_rslora: bool) -> dict:
    per_module = {}
    for name, node in modules:
        rank = int(node.a.shape[-1])
        alpha = node.scale * (math.sqrt(rank) if use_rslora else rank)
        per_module[name] = (rank, _number(alpha))
    ranks = {n: r for n, (r, _) in per_module.items()}
    alphas = {n: a for n, (_, a) in per_module.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropouts = collections.Counter(node.dropout for _, node in modules)
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": _patterns(alphas, alpha),
        "lora_dropout": dropouts.most_common(1)[0][0],
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def _vera_config(modules, rank: int) -> dict:
    return {
        "peft_type": "VERA",
        "r": int(rank),
        "save_projection": True,
        "projection_prng_key": 0,
        "vera_dropout": collections.Counter(n.dropout for _, n in modules).most_common(1)[0][0],
        "d_initial": 0.1,
        "init_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def _patterns(values: dict[str, Any], default) -> dict[str, Any]:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries for modules whose value differs.

    PEFT matches a key ``k`` against a module name with ``(.*\\.)?(k)$``. A module's last
    name (``q_proj``) is used when every adapted module of that name has the same value;
    otherwise the module's full, regex-escaped name.
    """
    by_suffix: dict[str, set] = collections.defaultdict(set)
    for name, v in values.items():
        by_suffix[name.rsplit(".", 1)[-1]].add(v)
    out = {}
    for name, v in values.items():
        if v == default:
            continue
        suffix = name.rsplit(".", 1)[-1]
        if len(by_suffix[suffix]) == 1:
            out[suffix] = v
        else:
            out[re.escape(name)] = v
    return out


def _compact_names(names: list[str], flat, name_map: NameMap) -> list[str]:
    """PEFT ``target_modules`` for the project's Llama: a module's last name where that
    selects exactly the adapted modules of the model, else full module names (PEFT matches
    names exactly or by the ``.``-separated suffix). ``flat`` is the adapted tree flattened
    with paths (adapter nodes as leaves); the Llama's name map knows all its modules."""
    every = set()
    for p, leaf in flat:
        path = path_str(p)
        if is_adapter(leaf):
            stack = leaf.stack_shape
        elif getattr(leaf, "ndim", 0) >= 2:
            ax = _llama_axes(path, leaf)
            stack = tuple(leaf.shape[i] for i in ax.stack) if ax is not None else ()
        else:
            continue
        for index in np.ndindex(*stack):
            name = name_map(path, tuple(int(i) for i in index))
            if name is not None:
                every.add(name)
    adapted = set(names)
    by_suffix = collections.defaultdict(list)
    for n in names:
        by_suffix[n.rsplit(".", 1)[-1]].append(n)
    out = []
    for suffix, members in sorted(by_suffix.items()):
        others = {n for n in every if n == suffix or n.endswith("." + suffix)} - adapted
        out.extend([suffix] if not others else sorted(members))
    return out


# --- load ---------------------------------------------------------------------------------


def load(
    directory,
    params: PyTree,
    *,
    name_map: NameMap | None = None,
    axes: Mapping[str, Axes] | Callable[[str, Any], Axes | None] | None = None,
    tied: Mapping[str, str] | None = None,
    dtype: Any = jnp.float32,
) -> PyTree:
    """Reads a PEFT adapter directory (LoRA, rsLoRA, DoRA, VeRA) onto ``params``.

    Returns the adapted tree (``LoRA``/``DoRA``/``VeRA`` nodes, per-module ranks and alphas
    from ``rank_pattern``/``alpha_pattern``) that computes exactly what PEFT computes on the
    same base; train it on, ``merge`` it or ``save`` it back. Embedding adapters
    (``lora_embedding_A/B``) load onto the table ``name_map`` names (the project's Llama:
    ``embed_tokens/embedding``). The modules that get adapters
    are those with weights in the file. In a scanned stack, layers the file has no weights
    for get an identity adapter (``B = 0``, VeRA's ``b = 0``, DoRA's magnitude
    ``||W0||_c``), which is what PEFT's initialisation gives those layers. A base weight
    PEFT saved beside the adapter (``lm_head.base_layer.weight``, or ``lm_head.weight``
    written by ``save_embedding_layers``) replaces that kernel in the returned tree, as PEFT
    loads it over the base; a saved embedding table must equal the base's (a resized
    vocabulary is refused: load onto the resized base model instead).

    Refused, naming the option: anything PEFT would compute differently from these
    formulas (``lora_bias``, ``bias`` other than ``"none"`` with biases in the file (without
    any, as on a bias-free base, it loads), ``fan_in_fan_out`` for the
    project's Llama, whose projections are ``nn.Linear`` (with a ``name_map`` for a model
    with Conv1D weights it is accepted: it only says how the base stores its weight),
    ``modules_to_save``, an ``init_lora_weights`` that rewrites the base such as PiSSA or
    LoftQ (MiCA, which leaves the base as it is and computes plain LoRA, loads), an
    embedding adapter on a table ``params`` also use as their output layer (tied) unless
    PEFT tied it too (LoRA with ``ensure_weight_tying``), any other set option dora_jax does
    not know), tensors for
    modules ``name_map`` cannot place, tensors whose shapes do not fit ``params`` (an
    adapter for another base), VeRA without saved projections and DVoRA files.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base params, e.g. from :func:`dora_jax.models.llama.from_hf` (scanned or
        not).
      name_map: ``(path, index) -> module name`` (default: the project's Llama).
      axes: stack/input axes of kernels with more than 2 axes, as for
        :func:`dora_jax.wrap` (default: the project's Llama's scanned layers).
      tied: ``{embedding module: output module}`` for tables that ``params`` also use
        transposed as their output layer, ``{}`` for none; required with a ``name_map``
        when the file adapts an embedding (PEFT's adapter of a tied table changes the
        logits only if PEFT tied it too). The project's Llama says it itself.
      dtype: dtype of the adapter leaves.

    Example::

      config, params = dora_jax.models.llama.from_hf("SmolLM2-135M")
      adapted = dora_jax.peft.load("my-peft-adapter", params)
    """
    from safetensors import safe_open

    directory = pathlib.Path(directory)
    config = _read_config(directory)
    peft_type = config.get("peft_type")
    if peft_type == "DVORA" or "dora_jax_extension" in config:
        raise PeftFormatError(
            f"{directory} holds a DVoRA adapter written by dora_jax.peft.save: DVoRA has no "
            f"PEFT semantics, so it is not loaded as one. Restore DVoRA with "
            f"dora_jax.checkpoint."
        )
    if peft_type not in ("LORA", "VERA"):
        raise PeftFormatError(
            f"peft_type={peft_type!r} is not read by dora_jax (LORA, incl. DoRA, and VERA are)."
        )
    llama = name_map is None  # the project's Llama
    _check_options(config, peft_type, llama=llama)
    name_map = name_map or _llama_name_map()
    axes = axes if axes is not None else _llama_axes

    if not (directory / WEIGHTS_NAME).exists():
        raise PeftFormatError(
            f"{directory} has no {WEIGHTS_NAME}"
            + (
                " (only the pickled adapter_model.bin, which dora_jax does not read: save "
                "with PEFT's default safe_serialization=True)"
                if (directory / "adapter_model.bin").exists()
                else ""
            )
            + "."
        )
    with safe_open(str(directory / WEIGHTS_NAME), framework="numpy") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    biases = sorted(k for k in raw if k.endswith(".bias"))
    if config.get("bias", "none") != "none" and biases:
        # Without bias tensors in the file (a bias-free base), PEFT computes plain LoRA.
        raise PeftFormatError(
            f"adapter_config.json sets bias={config['bias']!r} and {WEIGHTS_NAME} holds "
            f"biases ({biases[:2]}...), which PEFT loads over the base's; dora_jax computes "
            f"only bias='none' and does not load it approximately. Put these biases into "
            f"params and remove them from the file, or train the adapter with bias='none'."
        )
    shared = {k: raw.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in raw}
    suffixes = (
        (
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_magnitude_vector",
            ".lora_embedding_A",
            ".lora_embedding_B",
        )
        if peft_type == "LORA"
        else (".vera_lambda_b", ".vera_lambda_d")
    )
    weights: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    # PEFT also saves the base weight of an adapted embedding or lm_head
    # (save_embedding_layers) and loads it over the base: do the same.
    base_weights: dict[str, np.ndarray] = {}
    # Whole weights of modules without an adapter (lm_head, embed_tokens): what
    # save_embedding_layers writes, by default after resize_token_embeddings.
    whole_weights: dict[str, np.ndarray] = {}
    embedded: set[str] = set()  # modules with PEFT's lora.Embedding tensors
    for key, value in raw.items():
        if key.startswith(PREFIX) and key.endswith(".base_layer.weight"):
            base_weights[key[len(PREFIX) : -len(".base_layer.weight")]] = value
            continue
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None and key.startswith(PREFIX) and key.endswith(".weight"):
            if not any(part in key for part in ("lora_", "vera_")):
                whole_weights[key[len(PREFIX) : -len(".weight")]] = value
                continue
        if key.endswith(".lora_magnitude_vector.weight"):  # older PEFT wrote the suffix
            suffix, key = ".lora_magnitude_vector", key[: -len(".weight")]
        if suffix is None or not key.startswith(PREFIX):
            raise PeftFormatError(f"{WEIGHTS_NAME} holds '{key}', which dora_jax does not read.")
        module, tensor = key[len(PREFIX) : -len(suffix)], suffix[1:]
        if tensor.startswith("lora_embedding_"):
            # An embedding's lora_embedding_A (r, vocab) and lora_embedding_B (features, r)
            # are a linear layer's lora_A (r, in) and lora_B (out, r) with in = vocab.
            embedded.add(module)
            tensor = f"lora_{tensor[-1]}.weight"
            if tensor in weights[module]:
                raise PeftFormatError(
                    f"module '{module}' has both linear and embedding LoRA tensors."
                )
        weights[module][tensor] = value
    if not weights:
        raise PeftFormatError(f"{directory / WEIGHTS_NAME} holds no adapter weights.")
    use_dora = bool(config.get("use_dora"))
    for module, w in weights.items():
        need = {"lora_A.weight", "lora_B.weight"} if peft_type == "LORA" else set(suffixes)
        need = {n.lstrip(".") for n in need} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(w) != need:
            raise PeftFormatError(
                f"module '{module}' has tensors {sorted(w)}, expected {sorted(need)} "
                f"(use_dora={use_dora})."
            )

    # Place every module on a kernel of params: (path, stack index).
    where: dict[str, tuple[str, tuple, Axes]] = {}
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, leaf in leaves.items():
        if getattr(leaf, "ndim", 0) < 2:
            continue
        try:
            ax, _ = _resolve_axes(path, leaf, axes)
        except ValueError:
            continue
        if ax.stack != tuple(range(len(ax.stack))):
            continue  # PEFT modules are single layers: only leading stack axes map to them
        for index in np.ndindex(*(leaf.shape[p] for p in ax.stack)):
            name = name_map(path, tuple(int(i) for i in index))
            if name is not None:
                where[name] = (path, tuple(int(i) for i in index), ax)
    # Embedding tables: the lora.Embedding modules, and the leaves named "embedding".
    tables = {m for m, (path, _, _) in where.items()
              if m in embedded or path.rsplit("/", 1)[-1] == "embedding"}  # fmt: skip
    for module in embedded & set(where):
        path, index, ax = where[module]
        if leaves[path].ndim != len(index) + 2 or ax.inputs != (len(index),):
            raise PeftFormatError(
                f"module '{module}' is an embedding adapter (lora_embedding_A/B), but name_map "
                f"places it on '{path}' {tuple(leaves[path].shape)} with input axes "
                f"{ax.inputs}: a table (vocab, features) is looked up by its first axis."
            )
    if tied is None:
        if not llama and embedded:
            raise PeftFormatError(
                f"the adapter adapts the embeddings {sorted(embedded)[:4]}: say whether the "
                f"model also uses one transposed as its output layer (tie_word_embeddings), "
                f"which changes what PEFT computes: tied={{'<embedding module>': 'lm_head'}} "
                f"if so, tied={{}} if not."
            )
        tied = _llama_tied(leaves) if llama else {}
    for module in sorted(embedded & set(tied) & set(where)):
        output = tied[module]
        for value in _drop_tied_output(
            module, output, config, weights, base_weights, whole_weights
        ):
            if not _equals_table(value, where, leaves, module):
                raise _resized_error(output, value)
    for module, value in whole_weights.items():
        if module in where and module not in tables:  # a kernel: over the base, as PEFT does
            base_weights[module] = value
        elif not (
            _equals_table(value, where, leaves, module)
            if module in where
            else _equals_base_embedding(module, value, leaves, llama)
        ):
            raise _resized_error(module, value)
    for module in sorted(tables & set(base_weights)):
        # PEFT saves an adapted embedding's table too (save_embedding_layers="auto").
        value = base_weights.pop(module)
        if not _equals_table(value, where, leaves, module):
            raise _resized_error(module, value)
    unplaced = sorted((set(weights) | set(base_weights)) - set(where))
    if unplaced:
        raise PeftFormatError(
            f"the adapter has weights for modules {unplaced[:4]} that name_map places on no "
            f"kernel of params (a different model, or a target dora_jax cannot map: pass "
            f"name_map= and axes=)."
            + (
                " These params tie lm_head to embed_tokens, so there is no lm_head kernel: "
                "the adapter adapts the output layer alone (PEFT does so on an untied "
                "model, and on a tied one without ensure_weight_tying, where the embedding "
                "lookup keeps the base table). Load it onto untied params, the table copied "
                "into lm_head (config = dataclasses.replace(config, tie_embeddings=False); "
                "params['lm_head'] = {'kernel': params['embed_tokens']['embedding'].T}), "
                "or retrain it with ensure_weight_tying=True (then embed_tokens and lm_head "
                "share the update, as here)."
                if llama
                and "lm_head" in unplaced
                and "embed_tokens/embedding" in leaves
                and "lm_head/kernel" not in leaves
                else ""
            )
        )

    if base_weights:
        params = _replace_bases(params, base_weights, where, leaves)
        leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    per_path: dict[str, dict[tuple, str]] = collections.defaultdict(dict)
    for module in weights:
        path, index, _ = where[module]
        per_path[path][index] = module
    rules = []
    for path, modules in per_path.items():
        found = {_module_settings(config, peft_type, m, weights[m]) for m in modules.values()}
        if len(found) > 1:
            raise PeftFormatError(
                f"modules {sorted(modules.values())[:4]} share the stacked kernel '{path}' but "
                f"have different (rank, alpha) {sorted(found)}: load onto unscanned params "
                f"(from_hf(..., scan_layers=False))."
            )
        rank, alpha = found.pop()
        method = ("dora" if use_dora else "lora") if peft_type == "LORA" else "vera"
        rule = dict(method=method, rank=rank, alpha=alpha, rslora=bool(config.get("use_rslora")))
        # Dropout only acts in training, where it should go on as PEFT would have trained.
        rule["dropout"] = float(config.get("lora_dropout", config.get("vera_dropout")) or 0.0)
        rules.append((f"^{re.escape(path)}$", rule))

    path_axes = {where[m][0]: where[m][2] for m in weights}
    # PEFT allows a rank above min(in, out) (r=256 on a 576 -> 192 projection): it wastes
    # parameters but computes exactly, so such adapters load as they are.
    adapted = _wrap(
        params, 8, lambda p, _: path_axes[p], None, method="dora", alpha=None,
        targets=lambda p, _: p in per_path, key=jax.random.key(0), dropout=0.0, rslora=False,
        exact_norm_grad=False, dtype=dtype, rules=rules, any_rank=True,
    )  # fmt: skip

    if peft_type == "VERA":
        shared = _vera_shared(config, shared, per_path, leaves, path_axes, dtype)

    def fill(p, node):
        if not is_adapter(node):
            return node
        path = path_str(p)
        return _filled(node, path, per_path[path], weights, shared, dtype)

    return jax.tree_util.tree_map_with_path(fill, adapted, is_leaf=is_adapter)


def _replace_bases(params, base_weights, where, leaves):
    """``params`` with the kernels the file carries a base weight for replaced by it."""
    new = {}
    for module, weight in base_weights.items():
        path, index, ax = where[module]
        kernel = new.get(path, None)
        if kernel is None:
            kernel = new[path] = np.array(leaves[path])
        shape = kernel[index].shape
        # One layer's kernel: its input axes, with the stack axes sliced off.
        _, inputs, outputs = Axes((), tuple(p - len(ax.stack) for p in ax.inputs)).split(len(shape))
        in_shape, out_shape = [shape[p] for p in inputs], [shape[p] for p in outputs]
        if weight.shape != (math.prod(out_shape), math.prod(in_shape)):
            raise _shape_error(module, "base_layer.weight", weight.shape, shape[::-1])
        w = np.transpose(weight).reshape(*in_shape, *out_shape)
        kernel[index] = np.asarray(to_kernel_layout(w, len(shape), (), inputs), kernel.dtype)

    def pick(p, x):
        path = path_str(p)
        return jnp.asarray(new[path], x.dtype) if path in new else x

    return jax.tree_util.tree_map_with_path(pick, params)


def _read_config(directory: pathlib.Path) -> dict:
    """``adapter_config.json`` as a dict, or a clear error."""
    path = directory / CONFIG_NAME
    if not path.exists():
        inside = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}"))
        hint = (
            f" It has adapters in subfolders {inside[:4]} (PEFT saves a named adapter, or "
            f"selected_adapters, there): pass one of them, e.g. {directory / inside[0]}."
            if inside
            else " Pass the folder PeftModel.save_pretrained wrote."
        )
        raise PeftFormatError(f"{directory} has no {CONFIG_NAME}.{hint}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PeftFormatError(f"{path} is not valid JSON ({e}); it is damaged.") from e
    if not isinstance(config, dict):
        raise PeftFormatError(
            f"{path} holds a JSON {type(config).__name__}, not the object PEFT writes."
        )
    return config


def _resized_error(module: str, value: np.ndarray) -> PeftFormatError:
    return PeftFormatError(
        f"{WEIGHTS_NAME} holds the whole weight of '{module}' {value.shape}, which PEFT "
        f"writes with save_embedding_layers=True, and by default after "
        f"resize_token_embeddings, and loads over the base. dora_jax loads such "
        f"weights for kernels, not for embeddings that differ from the base's: save "
        f"the resized base model (save_pretrained), read it with from_hf and load the "
        f"adapter onto it, or save the adapter with save_embedding_layers=False."
    )


def _equals_table(value: np.ndarray, where: dict, leaves: dict, module: str) -> bool:
    """Whether a saved table (torch's ``(vocab, features)``, as Flax's) equals the base's."""
    path, index, _ = where[module]
    return _same_table(leaves[path][index], value)


def _same_table(table, value: np.ndarray) -> bool:
    """Whether ``value`` (saved by PEFT) is ``table``, exactly, in ``table``'s dtype."""
    table = np.asarray(table)
    return table.shape == value.shape and bool(
        np.array_equal(table, np.asarray(value).astype(table.dtype))
    )


def _drop_tied_output(module, output, config, weights, base_weights, whole_weights) -> list:
    """Checks that PEFT computes what dora_jax does for the embedding ``module`` the model
    also uses transposed as its output layer ``output``, and drops ``output``'s tensors
    (the table's own, transposed: they load as the table's adapter). Returns the base
    weights saved for ``output``."""
    if not config.get("ensure_weight_tying"):
        raise PeftFormatError(
            f"the adapter adapts the embedding '{module}', which these params also use "
            f"(transposed) as their output layer '{output}' (tied). PEFT saved it without "
            f"ensure_weight_tying, so its '{output}' keeps the base table while only the "
            f"lookup is adapted; dora_jax adapts the shared table in both uses and cannot "
            f"compute that. Load onto an untied base (tie_word_embeddings=False, with the "
            f"table copied to lm_head), or train the adapter with ensure_weight_tying=True."
        )
    if config.get("use_dora"):
        raise PeftFormatError(
            f"the adapter is DoRA on the embedding '{module}', tied to the output layer "
            f"'{output}': PEFT gives the tied '{output}' a magnitude of its own, one per "
            f"vocabulary row, while dora_jax scales the shared table per feature in both "
            f"uses. Load onto an untied base (tie_word_embeddings=False)."
        )
    w, tied_w = weights[module], weights.pop(output, None)
    if tied_w is not None and not (
        set(tied_w) == {"lora_A.weight", "lora_B.weight"}
        and np.array_equal(tied_w["lora_A.weight"], w["lora_B.weight"].T)
        and np.array_equal(tied_w["lora_B.weight"], w["lora_A.weight"].T)
        and _module_settings(config, "LORA", output, tied_w)
        == _module_settings(config, "LORA", module, w)
    ):
        raise PeftFormatError(
            f"'{output}' is tied to the embedding '{module}' but its adapter tensors or its "
            f"rank/alpha are not the embedding's, transposed: PEFT's tied layer shares them."
        )
    # The output layer's base weight is the table itself: the caller checks it as such.
    return [saved.pop(output) for saved in (base_weights, whole_weights) if output in saved]


def _equals_base_embedding(module: str, value: np.ndarray, leaves: dict, llama: bool) -> bool:
    """Whether a saved embedding table (or a tied model's ``lm_head``, the same table) equals
    the project's Llama's own: then there is nothing to load."""
    table = leaves.get("embed_tokens/embedding") if llama else None
    if module not in ("model.embed_tokens", "lm_head") or table is None:
        return False
    return _same_table(table, value)


def _check_options(config: dict, peft_type: str, llama: bool) -> None:
    handled, init_only = (
        (_LORA_HANDLED, _LORA_INIT_ONLY)
        if peft_type == "LORA"
        else (_VERA_HANDLED, _VERA_INIT_ONLY)
    )
    for option, value in config.items():
        if option == "fan_in_fan_out" and not llama:
            # Says how the base weight is stored (GPT-2's Conv1D keeps (in, out)); PEFT's
            # lora_A (r, in) and lora_B (out, r) mean the same update either way.
            continue
        if option in _MUST_BE_DEFAULT:
            if value != _MUST_BE_DEFAULT[option] and not (
                option == "modules_to_save" and not value
            ):
                raise PeftFormatError(
                    f"adapter_config.json sets {option}={value!r}; dora_jax computes only "
                    f"{option}={_MUST_BE_DEFAULT[option]!r} and does not load it approximately."
                )
        elif option == "init_lora_weights":
            if value not in _PLAIN_INITS:
                raise PeftFormatError(
                    f"adapter_config.json sets init_lora_weights={value!r}, which rewrites the "
                    f"base weights at initialisation: the adapter only fits that rewritten "
                    f"base. Convert it to a plain LoRA with PEFT first (save_pretrained(..., "
                    f"path_initial_model_for_weight_conversion=...))."
                )
        elif option in handled or option in init_only or option in _METADATA:
            continue
        elif value not in (None, False, {}, [], ""):
            raise PeftFormatError(
                f"adapter_config.json sets {option}={value!r}, an option dora_jax does not "
                f"implement; it is not loaded approximately."
            )
    if peft_type == "VERA" and not config.get("save_projection", True):
        raise PeftFormatError(
            "adapter_config.json has save_projection=false: VeRA's shared matrices are not in "
            "the file, and regenerating them needs torch's random generator. Save the "
            "adapter with save_projection=True."
        )


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's lookup (``peft.utils.other.get_pattern_key``): the first key ``k`` of
    ``pattern`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_settings(config, peft_type, module, w) -> tuple[int, float | None]:
    if peft_type == "VERA":
        return int(config["r"]), None
    rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if w["lora_A.weight"].shape[0] != rank or w["lora_B.weight"].shape[1] != rank:
        raise PeftFormatError(
            f"module '{module}': adapter_config.json gives rank {rank}, but its tensors have "
            f"lora_A {w['lora_A.weight'].shape}, lora_B {w['lora_B.weight'].shape}."
        )
    return rank, float(alpha)


def _shape_error(module, tensor, got, want):
    return PeftFormatError(
        f"module '{module}': {tensor} has shape {tuple(got)}, but the kernel in params needs "
        f"{tuple(want)}: the adapter was made for another base model."
    )


def _vera_shared(config, shared, per_path, leaves, path_axes, dtype):
    if set(shared) != {"base_model.vera_A", "base_model.vera_B"}:
        raise PeftFormatError("a VeRA adapter file needs base_model.vera_A and base_model.vera_B.")
    vera_a, vera_b = shared["base_model.vera_A"], shared["base_model.vera_B"]
    rank = int(config["r"])
    for path in per_path:
        leaf, ax = leaves[path], path_axes[path]
        _, inputs, outputs = ax.split(leaf.ndim)
        n_in = math.prod(leaf.shape[p] for p in inputs)
        n_out = math.prod(leaf.shape[p] for p in outputs)
        if vera_a.shape[0] != rank or vera_a.shape[1] < n_in:
            raise _shape_error(path, "base_model.vera_A", vera_a.shape, (rank, f">={n_in}"))
        if vera_b.shape[1] != rank or vera_b.shape[0] < n_out:
            raise _shape_error(path, "base_model.vera_B", vera_b.shape, (f">={n_out}", rank))
    return jnp.asarray(vera_a.T, dtype), jnp.asarray(vera_b.T, dtype)


def _filled(node, path, modules, weights, shared, dtype):
    """``node`` with its leaves taken from the file's tensors (layer by layer for stacks)."""
    stack, in_shape, out_shape = node.stack_shape, node.in_shape, node.out_shape
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if isinstance(node, (LoRA, DoRA)):
        rank = node.a.shape[-1]
        fields = {"a": np.array(node.a), "b": np.zeros(node.b.shape, np.float32)}
        wants = {"lora_A.weight": (rank, n_in), "lora_B.weight": (n_out, rank)}
        if isinstance(node, DoRA):
            fields["magnitude"] = np.array(node.magnitude)  # ||W0||_c where not in the file
            wants["lora_magnitude_vector"] = (n_out,)
    else:
        rank = node.d.shape[-1]
        fields = {"d": np.array(node.d), "b": np.zeros(node.b.shape, np.float32)}
        wants = {"vera_lambda_d": (rank,), "vera_lambda_b": (n_out,)}
    for index in np.ndindex(*stack):
        module = modules.get(tuple(int(i) for i in index))
        if module is None:
            continue  # a layer the adapter does not touch: identity, as PEFT's init
        w = weights[module]
        for tensor, want in wants.items():
            if tuple(w[tensor].shape) != want:
                raise _shape_error(module, tensor, w[tensor].shape, want)
        if isinstance(node, (LoRA, DoRA)):
            fields["a"][index] = w["lora_A.weight"].T.reshape(*in_shape, rank)
            fields["b"][index] = w["lora_B.weight"].T.reshape(rank, *out_shape)
            if isinstance(node, DoRA):
                fields["magnitude"][index] = w["lora_magnitude_vector"].reshape(out_shape)
        else:
            fields["d"][index] = w["vera_lambda_d"]
            fields["b"][index] = w["vera_lambda_b"].reshape(out_shape)
    new = {k: jnp.asarray(v, dtype) for k, v in fields.items()}
    if isinstance(node, VeRA):
        new["shared_a"], new["shared_b"] = shared
    return dataclasses.replace(node, **new)
