"""Shared test helpers: plain-jnp references of the formulas, tiny models and checkpoints.

The references (``lora_delta``, ``vera_delta``, ``decompose``, ``flat2``) are those of
docs/conventions.md, independent of dora_jax. Kernels are taken flattened to
``(*stack, in, out)``: the reference does the obvious thing, forming ``V = W0 + dW`` and its
column norm directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(code: str, devices: int, *, timeout: int = 600, env=None):
    """``python -c code`` from the repository root on ``devices`` simulated CPU devices.

    jax reads ``XLA_FLAGS`` when it starts, so a multi-device run needs its own process.
    ``env`` defaults to this process's environment. Returns the ``CompletedProcess``.
    """
    env = {**(os.environ if env is None else env)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=ROOT,
    )  # fmt: skip


def device_result(code: str, devices: int, **kwargs) -> dict:
    """:func:`run_on_devices`, asserting the script exited cleanly, and the JSON it printed on
    its line starting ``RESULT``."""
    proc = run_on_devices(code, devices, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def case_result(result: dict, name: str) -> dict:
    """Case ``name`` of a :func:`device_result` whose script records each case's outcome,
    failing with the script's traceback where the case raised (``{"error": ...}``)."""
    got = result[name]
    assert "error" not in got, f"{name}:\n{got['error']}"
    return got


def record_case(out: dict, name: str, thunk) -> None:
    """``out[name] = thunk()``, or ``{"error": traceback}`` where it raised: the recorder of
    the device scripts whose cases :func:`case_result` reads."""
    try:
        out[name] = thunk()
    except Exception:
        import traceback

        out[name] = {"error": traceback.format_exc()[-2500:]}


# Never the network: every Hugging Face model here is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


# --- optional packages ---------------------------------------------------------------------


def require_package(module: str, install: str) -> None:
    """Skips when an optional asset package is missing, unless the run requires assets.

    ``scripts/test.sh`` (and so CI) installs the assets and sets
    ``DORA_JAX_REQUIRE_ASSETS=1``: there a missing package is a failure, never a skip.
    """
    if importlib.util.find_spec(module) is not None:
        return
    message = f"needs the '{module}' package: {install}"
    if os.environ.get("DORA_JAX_REQUIRE_ASSETS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_hf() -> None:
    """At a test module's top: skips the module when torch, transformers, peft or
    safetensors is missing.

    scripts/test.sh installs these (the "test" extra) and sets DORA_JAX_REQUIRE_ASSETS=1:
    there a missing one fails the run, never skips it.
    """
    missing = [m for m in ("torch", "transformers", "peft", "safetensors")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        message = f'needs {missing}: pip install torch==2.13.0 && pip install -e ".[test]"'
        if os.environ.get("DORA_JAX_REQUIRE_ASSETS") == "1":
            raise ImportError(message)
        pytest.skip(message, allow_module_level=True)
    import torch

    torch.set_num_threads(1)


# --- plain-jnp references of the formulas --------------------------------------------------


def lora_delta(a, b, scale):
    """``s A B`` for ``a (..., in, r)``, ``b (..., r, out)``."""
    return scale * jnp.matmul(a, b)


def vera_delta(shared_a, shared_b, d, b, n_in, n_out):
    """``A_s[:in] diag(d) B_s[:, :out] diag(b)`` for ``d (..., r)``, ``b (..., out)``."""
    a = shared_a[:n_in]
    bs = shared_b[:, :n_out]
    return jnp.matmul(a * d[..., None, :], bs) * b[..., None, :]


def decompose(v, m, exact=False):
    """``m * V / ||V||_c`` (norm over the input axis), the norm detached unless ``exact``."""
    norm = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
    if not exact:
        norm = jax.lax.stop_gradient(norm)
    return m[..., None, :] * v / norm


def flat2(w, n_stack, n_in):
    """Reshapes a kernel ``(*stack, *in, *out)`` to ``(*stack, in, out)``.

    ``n_stack`` and ``n_in`` may also be tuples of axis positions (a kernel of any layout):
    the kernel is then first transposed to ``(*stack, *in, *out)``.
    """
    if isinstance(n_stack, tuple) or isinstance(n_in, tuple):
        stack, inputs = tuple(n_stack), tuple(n_in)
        outputs = tuple(p for p in range(w.ndim) if p not in stack + inputs)
        w = jnp.transpose(w, stack + inputs + outputs)
        n_stack, n_in = len(stack), len(inputs)
    s = w.shape[:n_stack]
    n_i = 1
    for d in w.shape[n_stack : n_stack + n_in]:
        n_i *= d
    return w.reshape(*s, n_i, -1)


def ref_kernel(node, exact=False):
    """W' of one node by the reference formula, in the node's kernel shape (float32)."""
    w0 = flat2(node.base, node.stack, node.inputs).astype(jnp.float32)
    stack_shape, (n_in, n_out) = w0.shape[:-2], w0.shape[-2:]
    if isinstance(node, (dora_jax.VeRA, dora_jax.DVoRA)):
        b = node.b.reshape(*stack_shape, n_out)
        v = w0 + vera_delta(node.shared_a, node.shared_b, node.d, b, n_in, n_out)
    elif isinstance(node, dora_jax.Magnitude):
        v = w0  # only the magnitude trains
    else:
        a = flat2(node.a, len(node.stack), len(node.inputs))
        b = node.b.reshape(*stack_shape, -1, n_out)
        v = w0 + lora_delta(a, b, node.scale)
    if isinstance(node, (dora_jax.DoRA, dora_jax.DVoRA, dora_jax.Magnitude)):
        v = decompose(v, node.magnitude.reshape(*stack_shape, n_out), exact=exact)
    # Back to the kernel's layout: v is (*stack, in, out) over the canonical axis order.
    canonical = (*node.stack, *node.inputs, *node.outputs)
    v = v.reshape([node.base.shape[p] for p in canonical])
    return jnp.transpose(v, np.argsort(canonical))


def ref_params(adapted, exact=False):
    """The params with every adapter node replaced by its ``ref_kernel``."""
    return jax.tree.map(
        lambda x: ref_kernel(x, exact) if dora_jax.is_adapter(x) else x,
        adapted,
        is_leaf=dora_jax.is_adapter,
    )


# --- adapted trees and tiny models ---------------------------------------------------------


def adapter_nodes(adapted) -> dict:
    """``{'/'-joined path: node}`` for every adapter node of a tree."""
    flat = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=dora_jax.is_adapter)[0]
    return {dora_jax.tree.path_str(p): x for p, x in flat if dora_jax.is_adapter(x)}


def rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    # Not chex.assert_trees_all_close: it cannot name penzai's tree keys.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def perturb(adapted, seed=0, size=0.05):
    """Moves every trainable leaf away from its init so B != 0 and m != ||W0||."""
    frozen, trainable = dora_jax.partition(adapted)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + size * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dora_jax.combine(frozen, jax.tree.unflatten(treedef, leaves))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="fc1")(x))
        return nn.Dense(5, name="fc2")(h)


def mlp_setup():
    """``MLP``, its params and an input batch."""
    x = jax.random.normal(jax.random.key(3), (4, 12))
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def small_dense():
    """One Dense kernel (6, 4) and its adapted tree (DoRA of rank 2)."""
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    return params, dora_jax.wrap(params, rank=2)


def tiny_llama(seed=0, dtype=jnp.float32, **overrides):
    """``LlamaConfig.tiny(**overrides)`` and its params in ``dtype``, initialised from ``seed``."""
    from dora_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.tiny(**overrides)
    model = Llama(cfg, param_dtype=dtype)
    return cfg, jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


# --- experiments/train_sharded.py, the trainer of the checkpoint and mesh tests -------------


@functools.cache
def train_sharded():
    """experiments/train_sharded.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "train_sharded", ROOT / "experiments" / "train_sharded.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sharded_trainer(**kwargs):
    """The script's ``Trainer`` of the tiny Llama on one device."""
    from dora_jax import sharding
    from dora_jax.models.llama import LlamaConfig

    return train_sharded().Trainer(LlamaConfig.tiny(), sharding.make_mesh(), **kwargs)


# --- tiny random Hugging Face Llama checkpoints (CPU, offline) -------------------------------

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(tied=True, config_cls=None, seed=0, **overrides):
    """A random ``LlamaForCausalLM`` (or ``config_cls``'s model) with weights far from init.

    Kernels get std 0.3 and norm scales 1 +- 0.2, so that logits are of order one and a
    wrong transpose, head order or norm mapping changes them visibly.
    """
    import torch
    import transformers

    config_cls = config_cls or transformers.LlamaConfig
    kw = {**SIZES, "tie_word_embeddings": tied, "rope_theta": 5e4, **overrides}
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def token_batch(seed=0, batch=2, seq=12, vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def torch_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return out.float().numpy()


# Steps of the mesh runs compared with one device (tests/test_sharding.py, tests/e2e/).
MESH_STEPS = 4


def uninterrupted_run():
    """Trainable params after 8 steps of batch 8x16 in one go (the script's settings)."""
    trainer = sharded_trainer()
    for i in range(8):
        trainer.step(i, 8, 16)
    return trainer.trainable_numpy()


def one_device_run(steps=MESH_STEPS):
    """Losses and trainable params of ``steps`` steps of the script's trainer on one device."""
    trainer = sharded_trainer()
    losses = [trainer.step(i, 8, 16) for i in range(steps)]
    return losses, trainer.trainable_numpy()


def hf_llama(directory):
    """The transformers Llama saved in ``directory``, in evaluation mode."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def adapted_logits(config, tree, tokens) -> np.ndarray:
    """Logits of dora_jax's Llama of ``config`` with (adapted) params ``tree``."""
    from dora_jax.models.llama import Llama

    fn = dora_jax.apply(Llama(config).apply)
    return np.asarray(jax.jit(fn)({"params": tree}, jnp.asarray(tokens)))


_ITEMSIZE = {"bool": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "s32": 4, "u32": 4}


def kept_sizes(loss, trainable, min_size: int, nbytes: bool = False) -> list[int]:
    """Sizes of the arrays of at least ``min_size`` values that ``grad(loss)`` keeps for
    its backward pass (from ``print_saved_residuals``; the arguments themselves excluded),
    in values or, with ``nbytes``, in bytes."""
    from jax.ad_checkpoint import print_saved_residuals

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, trainable)
    sizes = []
    for line in out.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\]", line)
        if match and "from the argument" not in line:
            size = math.prod(int(d) for d in match.group(2).split(",") if d)
            if size >= min_size:
                sizes.append(size * _ITEMSIZE[match.group(1)] if nbytes else size)
    return sizes
