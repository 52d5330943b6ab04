"""Per-kernel settings in wrap(rules=...) and the magnitude-only adapter."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from tests import helpers as ref
from tests.helpers import perturb


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(16, name="q_proj")(x)
        v = nn.Dense(16, name="v_proj")(x)
        h = jnp.tanh(q * v)
        up = nn.Dense(24, name="up_proj")(h)
        return nn.Dense(6, name="down_proj")(jax.nn.silu(up))


def block_reference(kernels, params, x):
    # The same block by hand, with the adapted kernels given explicitly.
    lin = lambda name, h: h @ kernels[name] + params[name]["bias"]  # noqa: E731
    h = jnp.tanh(lin("q_proj", x) * lin("v_proj", x))
    return lin("down_proj", jax.nn.silu(lin("up_proj", h)))


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (5, 12))
    model = Block()
    return model, model.init(jax.random.key(0), x)["params"], x


RULES = [
    (r"up_proj", dict(method="dora", rank=3)),
    (r"(q|v)_proj", dict(method="lora", rank=2, alpha=5.0, rslora=True)),
    (r"_proj", dict(method="lora", rank=4)),  # v_proj matched above: first match wins
]


def test_rules_give_each_kernel_its_settings(setup):
    _, params, _ = setup
    adapted = dora_jax.wrap(params, rank=8, method="magnitude", alpha=3.0, rules=RULES)
    q, v, up, down = (adapted[n]["kernel"] for n in ("q_proj", "v_proj", "up_proj", "down_proj"))
    assert type(q) is dora_jax.LoRA and type(v) is dora_jax.LoRA
    assert q.rank == 2 and q.scale == pytest.approx(5.0 / math.sqrt(2))
    assert type(up) is dora_jax.DoRA and up.rank == 3 and up.scale == pytest.approx(3.0 / 3)
    assert type(down) is dora_jax.LoRA and down.rank == 4 and down.scale == pytest.approx(3.0 / 4)
    alone = dora_jax.wrap(params, rank=8, method="magnitude", targets="fc|q_proj")
    assert type(alone["q_proj"]["kernel"]) is dora_jax.Magnitude


def test_mixed_methods_forward_and_merge_match_the_reference(setup):
    model, params, x = setup
    rules = [(r"up_proj", dict(method="vera", rank=6)), (r"down", dict(method="magnitude"))]
    adapted = perturb(dora_jax.wrap(params, rank=2, method="dora", rules=rules), size=0.2)
    kinds = {n: type(adapted[n]["kernel"]).__name__ for n in params}
    assert kinds == {
        "q_proj": "DoRA",
        "v_proj": "DoRA",
        "up_proj": "VeRA",
        "down_proj": "Magnitude",
    }

    def ref_kernels(adapted):
        out = {}
        for name in params:
            node = adapted[name]["kernel"]
            w0 = node.base
            if isinstance(node, dora_jax.VeRA):
                n_in, n_out = w0.shape
                out[name] = w0 + ref.vera_delta(
                    node.shared_a, node.shared_b, node.d, node.b, n_in, n_out
                )
            elif isinstance(node, dora_jax.Magnitude):
                out[name] = ref.decompose(w0, node.magnitude)
            else:
                out[name] = ref.decompose(
                    w0 + ref.lora_delta(node.a, node.b, node.scale), node.magnitude
                )
        return out

    expected = block_reference(ref_kernels(adapted), params, x)
    forward = dora_jax.apply(model.apply)
    for fn in (forward, jax.jit(forward)):
        np.testing.assert_allclose(fn({"params": adapted}, x), expected, rtol=1e-5, atol=1e-5)
    merged = dora_jax.merge(adapted)
    np.testing.assert_allclose(model.apply({"params": merged}, x), expected, rtol=1e-5, atol=1e-5)

    # Gradients of the trainable leaves equal the reference's, node by node.
    frozen, trainable = dora_jax.partition(adapted)
    loss = lambda t: jnp.sum(forward({"params": dora_jax.combine(frozen, t)}, x) ** 2)  # noqa: E731
    ref_loss = lambda t: jnp.sum(  # noqa: E731
        block_reference(ref_kernels(dora_jax.combine(frozen, t)), params, x) ** 2
    )
    got, want = jax.grad(loss)(trainable), jax.grad(ref_loss)(trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    assert set(jax.tree.leaves(dora_jax.trainable_mask(adapted["down_proj"]))) == {False, True}


def test_magnitude_only_starts_as_the_base_and_trains_only_m(setup):
    model, params, x = setup
    adapted = dora_jax.wrap(params, method="magnitude")
    node = adapted["up_proj"]["kernel"]
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(params["up_proj"]["kernel"], axis=0))
    y = dora_jax.apply(model.apply)({"params": adapted}, x)
    np.testing.assert_allclose(y, model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    _, trainable = dora_jax.partition(adapted)
    assert [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)] == [
        f"['{n}']['kernel'].magnitude" for n in sorted(params)
    ]


@pytest.mark.parametrize(
    "rules, error, match",
    [
        ([("q_proj", dict(ranks=3))], ValueError, r"\['ranks'\].*allowed keys"),
        ([("nothing_here", dict(rank=3))], ValueError, r"\['nothing_here'\] match no"),
        ([("q_proj", dict(method="ia3"))], ValueError, r"method='ia3'.*q_proj"),
        ([("q_proj", dict(rank=0))], ValueError, r"rank must be a positive int.*q_proj"),
        ([("q_proj", dict(rank=40))], ValueError, r"rank=40 .*'q_proj/kernel' \(max 12\)"),
        ([("q_proj", dict(method="vera", rank=5)), ("v_proj", dict(method="vera"))],
         ValueError, r"one rank.*\[4, 5\]"),
        (["q_proj"], TypeError, "must be a \\(regex, settings\\) pair"),
    ],
)  # fmt: skip
def test_bad_rules_are_refused(setup, rules, error, match):
    _, params, _ = setup
    with pytest.raises(error, match=match):
        dora_jax.wrap(params, rank=4, rules=rules)


def test_magnitude_only_nodes_shard_and_quantise(setup):
    _, params, _ = setup
    adapted = dora_jax.wrap(params, method="magnitude")
    mesh = dora_jax.sharding.make_mesh(devices=jax.devices()[:1])
    specs = dora_jax.sharding.shardings(adapted, mesh)
    assert isinstance(specs["up_proj"]["kernel"], dora_jax.Magnitude)
    quantised = dora_jax.quantize_base(adapted, "int8", block=4)
    node = quantised["up_proj"]["kernel"]
    w = node.base.dequantize()
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(w, axis=0), rtol=1e-6)
