"""The README's Python examples run as written."""

import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import adapter_nodes as nodes
from tests.helpers import require_package

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_quickstarts_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        if "tokens)" in block and "model.apply" in block and "import" not in block:
            continue  # the two-line teaser at the top uses names defined nowhere
        # A block inside a list item is indented with the item.
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)  # noqa: S102
    # The Linen quickstart trained: its merged params beat the base params on its batch.
    ns = namespace
    linen = ns["MLP"]()

    def loss(params):
        logits = linen.apply({"params": params}, ns["x"])
        return float(ns["optax"].softmax_cross_entropy_with_integer_labels(logits, ns["y"]).mean())

    assert loss(ns["merged"]) < loss(ns["params"]) - 0.1
    assert np.asarray(namespace["logits"]).shape == (32, 10)
    # The NNX loop trained through nnx.Optimizer and left every base kernel bit-identical.
    nnx, plain, trained = ns["nnx"], ns["plain_model"], ns["trained"]
    untrained = nnx.merge(ns["graphdef"], ns["state"])
    for layer in (0, 2):
        node = trained["layers"][layer]["kernel"].get_value()
        assert isinstance(node, ns["dora_jax"].DoRA)
        np.testing.assert_array_equal(node.base, ns["state"]["layers"][layer]["kernel"].get_value())

    def nnx_loss(m):
        logits = m(ns["x"])
        return float(ns["optax"].softmax_cross_entropy_with_integer_labels(logits, ns["y"]).mean())

    assert nnx_loss(plain) < nnx_loss(untrained) - 0.1

    # The LoRA+ recipe labels every trainable leaf by its adapter field.
    labels = ns["jax"].tree_util.tree_map_with_path(ns["field"], ns["trainable"])
    assert sorted(set(ns["jax"].tree.leaves(labels))) == ["a", "b", "magnitude"]

    # The NNX Block wrapped whole: every kernel adapted, axes read from its layers, and the
    # adapted block starts at the block itself.
    block, adapted_block = ns["block"], ns["adapted_block"]
    found = nodes(nnx.state(adapted_block))
    assert sorted(found) == [f"attn/{p}/kernel" for p in ("key", "out", "query", "value")] + [
        "conv/kernel"
    ]
    assert (found["attn/out/kernel"].inputs, found["conv/kernel"].inputs) == ((0, 1), (0, 1))
    np.testing.assert_allclose(ns["out"], block(ns["h"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ns["plain_block"](ns["h"]), block(ns["h"]), rtol=1e-5, atol=1e-5)

    # The Keras 3 recipe adapts every kernel of a Keras model and starts at the model itself.
    require_package("keras", "pip install keras (in the 'test' extra)")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    jax, dora_jax = ns["jax"], ns["dora_jax"]
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    out = keras.layers.Dense(4)(keras.layers.MultiHeadAttention(2, 4)(inp, inp))
    model = keras.Model(inp, out)
    xk = jax.random.normal(jax.random.key(0), (2, 6, 3))
    adapted, forward = ns["adapt_keras"](model, xk, rank=2)
    kinds = [type(adapted[v.path]) for v in model.trainable_variables if v.path.endswith("kernel")]
    assert kinds == [dora_jax.DoRA] * 5, kinds
    np.testing.assert_allclose(forward(adapted, xk), model(xk), rtol=1e-5, atol=1e-5)
