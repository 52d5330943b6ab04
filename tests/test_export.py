"""jax.export of functions over adapted trees: serialised, read back and called."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import dora_jax
from tests.helpers import mlp_setup, perturb


def _round_trip(fn, *args) -> tuple[export.Exported, export.Exported]:
    exported = export.export(jax.jit(fn))(*args)
    return exported, export.deserialize(exported.serialize())


def _read_back(restored: export.Exported, adapted, x):
    """The adapted tree as the read-back calling convention (args, kwargs) rebuilds it."""
    (tree, _), _ = jax.tree.unflatten(restored.in_tree, jax.tree.leaves(((adapted, x), {})))
    return tree


@pytest.mark.parametrize(
    "method, quantised",
    [("lora", None), ("dora", None), ("vera", None), ("dvora", None), ("magnitude", None),
     ("dora", "nf4"), ("dvora", "int8"), ("lora", "q4_1")],
)  # fmt: skip
def test_an_exported_forward_is_serialised_and_called_after_reading_back(method, quantised):
    model, params, x = mlp_setup()
    adapted = perturb(dora_jax.wrap(params, rank=2, method=method, key=jax.random.key(1)))
    if quantised:
        adapted = dora_jax.quantize_base(adapted, quantised, block=4)
    forward = dora_jax.apply(model.apply)
    exported, restored = _round_trip(lambda p, x: forward({"params": p}, x), adapted, x)
    assert restored.in_tree == exported.in_tree
    np.testing.assert_allclose(
        restored.call(adapted, x), forward({"params": adapted}, x), rtol=1e-6, atol=1e-6
    )
    kinds = {type(n).__name__ for n in jax.tree.leaves(adapted, is_leaf=dora_jax.is_adapter)}
    for kind in kinds - {"ArrayImpl"}:
        assert f"dora_jax.{kind}".encode() in exported.serialize()


def test_a_nodes_static_settings_read_back_unchanged():
    """alpha/rslora (the scale), dropout, the norm gradient and a stacked kernel's axes are
    aux data, not leaves: they must come back equal (a tuple a tuple, a float exactly)."""
    kernel = jax.random.normal(jax.random.key(0), (3, 6, 4))  # (layer, in, out)
    axes = {"kernel": dora_jax.Axes(stack=(0,), inputs=(1,))}
    adapted = dora_jax.wrap(
        {"w": {"kernel": kernel}}, rank=3, alpha=5.0, rslora=True, dropout=0.1,
        exact_norm_grad=True, axes=axes,
    )  # fmt: skip
    adapted = perturb(adapted)
    x = jnp.ones((3, 6))

    def fn(p, x):
        return jnp.einsum("li,lio->lo", x, dora_jax.merge(p)["w"]["kernel"])

    exported, restored = _round_trip(fn, adapted, x)
    node = _read_back(restored, adapted, x)["w"]["kernel"]
    saved = adapted["w"]["kernel"]
    assert node.scale == saved.scale == 5.0 / np.sqrt(3)
    assert (node.dropout, node.exact_norm_grad) == (0.1, True)
    assert (node.stack, node.inputs) == ((0,), (1,)) and isinstance(node.stack, tuple)
    np.testing.assert_array_equal(restored.call(adapted, x), fn(adapted, x))


def test_a_quantised_bases_dtype_and_layout_read_back_unchanged():
    kernel = jax.random.normal(jax.random.key(0), (4, 8), jnp.bfloat16)  # torch's (out, in)
    adapted = dora_jax.wrap(
        {"w": {"kernel": kernel}}, rank=2, axes={"kernel": dora_jax.Axes(inputs=(1,))}
    )
    adapted = dora_jax.quantize_base(adapted, "q4_1", block=4)
    x = jnp.ones((2, 8), jnp.bfloat16)

    def fn(p, x):
        return x @ dora_jax.merge(p)["w"]["kernel"].T

    exported, restored = _round_trip(fn, adapted, x)
    assert restored.in_tree == exported.in_tree
    base = _read_back(restored, adapted, x)["w"]["kernel"].base
    saved = adapted["w"]["kernel"].base
    assert (base.format, base.dtype, base.input_axes) == ("q4_1", jnp.bfloat16, (1,))
    assert (base.in_shape, base.out_shape) == (saved.in_shape, saved.out_shape)
    np.testing.assert_array_equal(restored.call(adapted, x), fn(adapted, x))
