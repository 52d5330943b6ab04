"""wrap, partition, combine, merge; per-kernel rules, the magnitude-only adapter; bad input."""

import dataclasses
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from tests import helpers as ref
from tests.helpers import mlp_setup, perturb, small_dense


@pytest.fixture(scope="module")
def setup():
    return mlp_setup()


@pytest.mark.parametrize("method", ["dora", "lora", "vera", "dvora"])
def test_identity_at_init(setup, method):
    model, params, x = setup
    adapted = dora_jax.wrap(params, rank=4, method=method)
    node = adapted["fc1"]["kernel"]
    assert np.all(node.b == 0)
    if method in ("vera", "dvora"):
        np.testing.assert_array_equal(node.d, np.full(4, 0.1, np.float32))
        # One pair of shared matrices, sized for the largest kernel (in 16, out 16).
        assert node.shared_a is adapted["fc2"]["kernel"].shared_a
        assert node.shared_a.shape == (16, 4) and node.shared_b.shape == (4, 16)
        assert np.all(np.abs(node.shared_a) <= 1 / np.sqrt(16))
        assert np.all(np.abs(node.shared_b) <= 1 / np.sqrt(4))
    else:
        assert np.any(node.a != 0) and np.all(np.abs(node.a) <= 1 / np.sqrt(12))
    if method in ("dora", "dvora"):
        np.testing.assert_allclose(node.magnitude, np.linalg.norm(params["fc1"]["kernel"], axis=0))
    y = dora_jax.apply(model.apply)({"params": adapted}, x)
    np.testing.assert_allclose(y, model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    merged = dora_jax.merge(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    jax.tree.map(close, merged, params)


def test_wrap_is_pure_and_keeps_other_leaves(setup):
    _, params, _ = setup
    before = jax.tree.map(np.array, params)
    adapted = dora_jax.wrap(params, rank=2)
    assert adapted["fc1"]["bias"] is params["fc1"]["bias"]
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert adapted["fc1"]["kernel"].base is params["fc1"]["kernel"]


def test_alpha_and_rslora_scale(setup):
    _, params, _ = setup
    assert dora_jax.wrap(params, rank=4)["fc1"]["kernel"].scale == 2.0
    assert dora_jax.wrap(params, rank=4, alpha=8)["fc1"]["kernel"].scale == 2.0
    assert dora_jax.wrap(params, rank=4, alpha=4, rslora=True)["fc1"]["kernel"].scale == 2.0


def test_targets(setup):
    _, params, _ = setup
    adapted = dora_jax.wrap(params, rank=2, targets=r"fc2/kernel$")
    assert not dora_jax.is_adapter(adapted["fc1"]["kernel"])
    assert dora_jax.is_adapter(adapted["fc2"]["kernel"])
    adapted = dora_jax.wrap(params, rank=2, targets=lambda path, leaf: path.startswith("fc1/k"))
    assert dora_jax.is_adapter(adapted["fc1"]["kernel"])
    assert not dora_jax.is_adapter(adapted["fc2"]["kernel"])


def test_partition_combine_round_trip(setup):
    _, params, _ = setup
    adapted = perturb(dora_jax.wrap(params, rank=2))
    frozen, trainable = dora_jax.partition(adapted)
    assert trainable["fc1"]["bias"] is None and frozen["fc1"]["kernel"].a is None
    assert {x.shape for x in jax.tree.leaves(trainable)} == {(12, 2), (2, 16), (16,), (16, 2),
                                                            (2, 5), (5,)}  # fmt: skip
    back = dora_jax.combine(frozen, trainable)
    assert jax.tree.structure(back) == jax.tree.structure(adapted)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)
    mask = dora_jax.trainable_mask(adapted)
    assert mask["fc1"]["kernel"].a and not mask["fc1"]["kernel"].base and not mask["fc1"]["bias"]


def test_combine_rejects_mismatched_trees(setup):
    _, params, _ = setup
    frozen, trainable = dora_jax.partition(dora_jax.wrap(params, rank=2))
    other = dora_jax.partition(dora_jax.wrap(params, rank=2, targets="fc1"))[1]
    with pytest.raises(ValueError, match="one dora_jax.partition call"):
        dora_jax.combine(frozen, other)
    with pytest.raises(ValueError, match="different structure"):
        dora_jax.combine(frozen, {"fc1": trainable["fc1"]})


# --- bad input ----------------------------------------------------------------------------


def test_no_target_names_the_matrices_the_tree_has():
    """Haiku and Gemma name their weights 'w', Equinox 'weight': wrap's default finds no
    'kernel' there and says which names the matrices do have, with a regex that picks them."""
    haiku_like = {
        "linear": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)},
        "linear_1": {"w": jnp.ones((8, 2)), "b": jnp.zeros(2)},
        "embed": {"embeddings": jnp.ones((10, 4))},
    }
    with pytest.raises(
        ValueError,
        match=r"default.*named 'w' \(2\), 'embeddings' \(1\).*"
        r"targets=r'\(\^\|/\)w\$'",
    ) as e:
        dora_jax.wrap(haiku_like, rank=2)
    suggested = re.search(r"targets=r'([^']+)'", str(e.value)).group(1)
    adapted = dora_jax.wrap(haiku_like, rank=2, targets=suggested)
    assert sorted(ref.adapter_nodes(adapted)) == ["linear/w", "linear_1/w"]
    with pytest.raises(ValueError, match=r"named '0' \(1\).*lambda path, leaf"):
        dora_jax.wrap([jnp.ones((4, 8)), jnp.zeros(8)], rank=2)
    with pytest.raises(ValueError, match="no floating leaf with two or more axes"):
        dora_jax.wrap({"b": jnp.zeros(8)}, rank=2)


def test_no_target_suggestion_says_which_leaves_are_biases_or_norms_and_skips_them():
    """penzai names every parameter 'data_array': the suggested regex would also pick
    biases and norm scales, so wrap says so and gives a predicate that skips them."""
    penzai_like = {
        "q": {"weights": {"data_array": jnp.ones((8, 8))}},
        "q_bias": {"bias": {"data_array": jnp.ones((2, 4))}},
        "norm": {"scale": {"data_array": jnp.ones(8)}},
    }
    with pytest.raises(ValueError, match=r"also picks 2 leaf\(s\) under bias or norm") as e:
        dora_jax.wrap(penzai_like, rank=2)
    suggested = re.search(r"(lambda path, leaf: path\.endswith.*?path\))", str(e.value)).group(1)
    adapted = dora_jax.wrap(penzai_like, rank=2, targets=eval(suggested, {"re": re}))
    assert sorted(ref.adapter_nodes(adapted)) == ["q/weights/data_array"]


def test_a_targeted_bias_is_said_to_be_no_kernel():
    params = {"proj": {"kernel": ref.rand(0, 8, 2, 4), "bias": ref.rand(1, 2, 4)}}

    def fn(p, x):
        return jnp.einsum("td,dnh->tnh", x, p["proj"]["kernel"]) + p["proj"]["bias"]

    axes = dora_jax.infer_axes(fn, params, ref.rand(2, 3, 8))
    assert "proj/bias" in axes.unread
    with pytest.raises(ValueError, match=r"'proj/bias'.*only elementwise.*not a kernel"):
        dora_jax.wrap(params, rank=2, targets=lambda path, leaf: leaf.ndim >= 2, axes=axes)


def test_errors(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match=r"No kernel matches targets='attention'.*'kernel' \(2\)"):
        dora_jax.wrap(params, targets="attention")
    with pytest.raises(ValueError, match=r"rank=13 is larger.*'fc1/kernel' \(max 12\).*rank <= 5"):
        dora_jax.wrap(params, rank=13)
    with pytest.raises(ValueError, match="already holds adapters"):
        dora_jax.wrap(dora_jax.wrap(params, rank=2), rank=2)
    with pytest.raises(ValueError, match="Cannot tell the input axes.*infer_axes"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, rank=2)
    with pytest.raises(TypeError, match="only floating kernels"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 4), jnp.int8)}}, rank=2, targets="q")
    with pytest.raises(ValueError, match="method="):
        dora_jax.wrap(params, method="dorra")
    with pytest.raises(ValueError, match="do not fit"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, axes={"q": dora_jax.Axes(1, 2)})
    with pytest.raises(ValueError, match="inconsistent"):
        dora_jax.infer_axes(
            lambda p, x: (
                jnp.einsum("bi,ijk->bjk", x, p["w"]["kernel"]).sum()
                + jnp.einsum(
                    "bij,ijk->bk", x.reshape(1, 2, 1) * jnp.ones((1, 2, 2)), p["w"]["kernel"]
                ).sum()
            ),
            {"w": {"kernel": jnp.ones((2, 2, 2))}},
            jnp.ones((1, 2)),
        )


# --- numbers wrap refuses, and the norm where the expansion fails ---------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("nan")}, "alpha must be a finite positive"),
        ({"alpha": float("inf")}, "alpha must be a finite positive"),
        ({"alpha": 0.0}, "alpha must be a finite positive"),
        ({"alpha": -2.0}, "alpha must be a finite positive"),
        ({"alpha": "16"}, "alpha must be a finite positive"),
        ({"rank": True}, "rank must be a positive int"),
        ({"rank": 2.0}, "rank must be a positive int"),
        ({"rank": 0}, "rank must be a positive int"),
        ({"dropout": float("nan")}, "dropout must be a number in"),
    ],
)
def test_wrap_refuses_nonsense_numbers(kwargs, message):
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match=message):
        dora_jax.wrap(params, **{"rank": 2, **kwargs})


def test_wrap_takes_numpy_integers_and_floats():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    node = dora_jax.wrap(params, rank=np.int64(2), alpha=np.float32(4))["dense"]["kernel"]
    plain = dora_jax.wrap(params, rank=2, alpha=4.0)["dense"]["kernel"]
    assert type(node.rank) is int and node.rank == 2 and node.scale == plain.scale == 2.0
    assert jax.tree.structure(node) == jax.tree.structure(plain)  # same static metadata


def test_partition_of_a_tree_without_adapters_is_a_clear_error():
    params, _ = small_dense()
    with pytest.raises(ValueError, match="partition got a tree without adapter nodes"):
        dora_jax.partition(params)


def test_merge_of_plain_params_returns_them_unchanged():
    # Evaluation code merges whatever it gets: the base model's params pass through.
    params, _ = small_dense()
    merged = dora_jax.merge(params)
    assert merged["dense"]["kernel"] is params["dense"]["kernel"]


def test_calling_an_adapted_model_without_apply_says_how():
    """A Linen model applied to adapted params, or an adapted NNX model called directly,
    reaches an adapter node as if it were its kernel: the error names apply and merge."""
    x = jnp.ones((2, 4))
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(TypeError, match=r"call the model through dora_jax.apply.*merge"):
        model.apply({"params": dora_jax.wrap(params, rank=2)}, x)
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    adapted = dora_jax.wrap(layer, rank=2)
    with pytest.raises(TypeError, match=r"dora_jax.apply\(lambda model, x: model\(x\)\)"):
        adapted(x)
    # numpy made a 0-d object array of the node, without a word.
    with pytest.raises(TypeError, match=r"An adapter node \(DoRA, base \(4, 3\)\) was used"):
        np.asarray(dora_jax.wrap(params, rank=2)["kernel"])
    np.testing.assert_allclose(dora_jax.apply(lambda m, x: m(x))(adapted, x), layer(x), rtol=1e-6)


def test_wrap_of_an_nnx_model_names_a_layer_that_does_not_say_its_layout():
    """An Einsum whose equation comes at call time cannot say its kernel's axes: wrap(model)
    asks for them (and does not tell the user to pass the module, which they did)."""
    einsum = nnx.Einsum("btd,ndh->btnh", (2, 8, 4), rngs=nnx.Rngs(0))
    einsum.einsum_str = None  # given to __call__ instead
    with pytest.raises(ValueError, match="Its NNX layer does not say its layout") as info:
        dora_jax.wrap(einsum, rank=2)
    assert "pass the module itself" not in str(info.value)
    with pytest.raises(ValueError, match=r"pass the module itself, wrap\(model"):
        dora_jax.wrap(nnx.state(einsum), rank=2)
    adapted = dora_jax.wrap(einsum, rank=2, axes={"kernel": dora_jax.Axes((), (1,))})
    assert adapted.kernel.get_value().inputs == (1,)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_wrap_of_an_nnx_conv_transpose_reads_its_layout(transpose_kernel):
    """nnx.ConvTranspose's kernel is (*window, in, out), or (*window, out, in) with
    transpose_kernel=True (flipped and swapped before the convolution): both stay factored."""
    layer = nnx.ConvTranspose(3, 4, (3, 2), strides=2, transpose_kernel=transpose_kernel,
                              rngs=nnx.Rngs(0))  # fmt: skip
    adapted = dora_jax.wrap(layer, rank=2)
    node = perturb({"k": adapted.kernel.get_value()}, size=0.3)["k"]
    assert node.inputs == ((0, 1, 3) if transpose_kernel else (0, 1, 2))
    assert node.magnitude.shape == (4,)
    adapted.kernel.set_value(node)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 3))
    y = dora_jax.apply(lambda m, x: m(x), strict=True)(adapted, x)
    layer.kernel.set_value(ref.ref_kernel(node))
    np.testing.assert_allclose(y, layer(x), rtol=1e-5, atol=1e-5)


def test_an_adapter_node_answers_its_kernels_shape_and_dtype():
    # Model code reads these outside a forward (Gemma's init_cache: kv_einsum.kernel.shape).
    layer = nnx.Einsum("btd,ndh->btnh", (2, 8, 4), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    adapted = dora_jax.wrap(layer, rank=2)
    for method in ("lora", "dora", "vera"):
        kernel = dora_jax.wrap(layer, rank=2, method=method).kernel
        assert (kernel.shape, kernel.dtype, kernel.ndim, kernel.size) == (
            (2, 8, 4),
            jnp.bfloat16,
            3,
            64,
        )
    assert np.shape(adapted.kernel.get_value()) == (2, 8, 4)
    quantised = dora_jax.quantize_base(dora_jax.wrap({"w": {"kernel": jnp.ones((8, 4))}}, rank=2))
    assert quantised["w"]["kernel"].shape == (8, 4)


def test_merge_of_one_half_is_a_clear_error():
    _, adapted = small_dense()
    frozen, trainable = dora_jax.partition(adapted)
    with pytest.raises(ValueError, match="merge got the frozen half.*combine"):
        dora_jax.merge(frozen)
    with pytest.raises(ValueError, match="merge got the trainable half"):
        dora_jax.merge(trainable)


def test_combine_with_a_trainable_half_of_another_shape_is_a_clear_error():
    params, adapted = small_dense()
    frozen, _ = dora_jax.partition(adapted)
    _, wider = dora_jax.partition(dora_jax.wrap({"dense": {"kernel": jnp.ones((6, 5))}}, rank=2))
    with pytest.raises(ValueError, match="'dense/kernel'.*do not fit its base of shape \\(6, 4\\)"):
        dora_jax.combine(frozen, wider)


# --- per-kernel settings: wrap(rules=...) and the magnitude-only adapter ------------------


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
def rules_setup():
    x = jax.random.normal(jax.random.key(1), (5, 12))
    model = Block()
    return model, model.init(jax.random.key(0), x)["params"], x


RULES = [
    (r"up_proj", dict(method="dora", rank=3)),
    (r"(q|v)_proj", dict(method="lora", rank=2, alpha=5.0, rslora=True)),
    (r"_proj", dict(method="lora", rank=4)),  # v_proj matched above: first match wins
]


def test_rules_give_each_kernel_its_settings(rules_setup):
    _, params, _ = rules_setup
    adapted = dora_jax.wrap(params, rank=8, method="magnitude", alpha=3.0, rules=RULES)
    q, v, up, down = (adapted[n]["kernel"] for n in ("q_proj", "v_proj", "up_proj", "down_proj"))
    assert type(q) is dora_jax.LoRA and type(v) is dora_jax.LoRA
    assert q.rank == 2 and q.scale == pytest.approx(5.0 / math.sqrt(2))
    assert type(up) is dora_jax.DoRA and up.rank == 3 and up.scale == pytest.approx(3.0 / 3)
    assert type(down) is dora_jax.LoRA and down.rank == 4 and down.scale == pytest.approx(3.0 / 4)
    alone = dora_jax.wrap(params, rank=8, method="magnitude", targets="fc|q_proj")
    assert type(alone["q_proj"]["kernel"]) is dora_jax.Magnitude


def test_mixed_methods_forward_and_merge_match_the_reference(rules_setup):
    model, params, x = rules_setup
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


def test_magnitude_only_starts_as_the_base_and_trains_only_m(rules_setup):
    model, params, x = rules_setup
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
def test_bad_rules_are_refused(rules_setup, rules, error, match):
    _, params, _ = rules_setup
    with pytest.raises(error, match=match):
        dora_jax.wrap(params, rank=4, rules=rules)


def test_magnitude_only_nodes_shard_and_quantise(rules_setup):
    _, params, _ = rules_setup
    adapted = dora_jax.wrap(params, method="magnitude")
    mesh = dora_jax.sharding.make_mesh(devices=jax.devices()[:1])
    specs = dora_jax.sharding.shardings(adapted, mesh)
    assert isinstance(specs["up_proj"]["kernel"], dora_jax.Magnitude)
    quantised = dora_jax.quantize_base(adapted, "int8", block=4)
    node = quantised["up_proj"]["kernel"]
    w = node.base.dequantize()
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(w, axis=0), rtol=1e-6)


def test_vera_and_dvora_mixed_by_rules_share_one_pair_and_one_rank():
    # One pair of shared matrices per tree (the conventions): a checkpoint stores it once.
    params = {"a": {"kernel": ref.rand(1, 16, 32)}, "b": {"kernel": ref.rand(2, 16, 16)}}
    adapted = dora_jax.wrap(params, rank=4, method="dvora", rules=[("^b/", dict(method="vera"))])
    a, b = adapted["a"]["kernel"], adapted["b"]["kernel"]
    assert isinstance(a, dora_jax.DVoRA) and isinstance(b, dora_jax.VeRA)
    assert a.shared_a is b.shared_a and a.shared_b is b.shared_b
    assert a.shared_a.shape == (16, 4) and a.shared_b.shape == (4, 32)
    with pytest.raises(ValueError, match=r"DVoRA and VeRA kernels share one pair.*\[4, 8\]"):
        dora_jax.wrap(params, rank=4, method="dvora", rules=[("^b/", dict(method="vera", rank=8))])


def test_a_bfloat16_adapters_scale_is_not_rounded_to_bfloat16():
    # s = 16 / 3 = 5.3333 is 5.34375 in bfloat16: rounded before multiplying B it would
    # bias every update by +0.2%.
    params = {"kernel": ref.rand(0, 32, 24)}
    adapted = dora_jax.wrap(params, rank=3, alpha=16.0, method="lora", dtype=jnp.bfloat16)
    node = adapted["kernel"]
    node = dataclasses.replace(node, b=ref.rand(1, *node.b.shape).astype(jnp.bfloat16))
    delta = dora_jax.merge({"kernel": node})["kernel"] - params["kernel"]
    want = (16.0 / 3.0) * node.a.astype(jnp.float32) @ node.b.astype(jnp.float32)
    ratio = float(jnp.sum(delta * want) / jnp.sum(want * want))
    assert abs(ratio - 1.0) < 5e-4, ratio


# Clear errors for settings wrap used to misread or report unhelpfully.
TWO = {"attn": {"q": {"kernel": ref.rand(0, 8, 8)}}, "mlp": {"up": {"kernel": ref.rand(1, 8, 8)}}}


def test_a_shadowed_rule_is_refused_naming_the_earlier_rule_that_wins():
    with pytest.raises(ValueError, match=r"rules\[1\] \('attn/q'\) is shadowed.*first matching "
                       r"rule wins.*'attn/q/kernel' by rules\[0\] \('attn'\)"):  # fmt: skip
        dora_jax.wrap(TWO, rank=2, rules=[("attn", dict(rank=4)), ("attn/q", dict(rank=1))])
    # In the other order both rules are used.
    adapted = dora_jax.wrap(TWO, rank=2, rules=[("attn/q", dict(rank=1)), ("attn|mlp", {})])
    assert adapted["attn"]["q"]["kernel"].rank == 1 and adapted["mlp"]["up"]["kernel"].rank == 2


@pytest.mark.parametrize(
    "rules, match",
    [
        (
            [("mlp", 4)],
            r"rules\[0\] must be a \(regex, settings\) pair, settings a dict.*\('mlp', 4\)",
        ),
        ({"mlp": dict(rank=4)}, r"ordered list of \(regex, dict of settings\) pairs.*dict"),
    ],
)
def test_rules_that_are_not_regex_and_settings_pairs_are_refused(rules, match):
    with pytest.raises(TypeError, match=match):
        dora_jax.wrap(TWO, rank=2, rules=rules)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rules=[("mlp(", dict(rank=4))]), r"rules\[0\] 'mlp\(' is not a valid regex"),
        (dict(targets="mlp("), r"targets= 'mlp\(' is not a valid regex"),
        (dict(targets=["attn", "[q"]), r"targets= '\[q' is not a valid regex"),
        (dict(axes={"mlp(": dora_jax.Axes(0, 1)}), r"axes= key 'mlp\(' is not a valid regex"),
    ],
)
def test_a_bad_regex_is_refused_naming_the_argument_and_pattern(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dora_jax.wrap(TWO, rank=2, **kwargs)


def test_a_leaf_with_fewer_than_two_axes_picked_by_targets_is_not_a_kernel():
    params = {"dense": {"kernel": ref.rand(0, 8, 4), "bias": jnp.zeros(4)}, "scale": jnp.ones(())}
    for picked, shape in (("dense/bias", r"\(4,\)"), ("scale", r"\(\)")):
        targets = lambda path, leaf, p=picked: path in (p, "dense/kernel")  # noqa: E731
        match = f"'{picked}' with shape {shape}.*at least 2 axes.*narrower targets="
        with pytest.raises(ValueError, match=match):
            dora_jax.wrap(params, rank=2, targets=targets)


def test_zero_d_numeric_arrays_are_numbers_but_bools_and_floats_for_rank_are_not():
    plain = dora_jax.wrap(TWO, rank=4, alpha=4.0, dropout=0.25)["mlp"]["up"]["kernel"]
    node = dora_jax.wrap(TWO, rank=jnp.int32(4), alpha=jnp.float32(4), dropout=np.array(0.25))
    node = node["mlp"]["up"]["kernel"]
    assert (node.rank, node.scale, node.dropout) == (plain.rank, plain.scale, plain.dropout)
    assert type(node.dropout) is float  # static data: hashable
    ruled = dora_jax.wrap(TWO, rank=2, rules=[("mlp", dict(rank=np.int64(4), alpha=jnp.array(4)))])
    assert ruled["mlp"]["up"]["kernel"].scale == plain.scale
    refused = [dict(rank=jnp.float32(4)), dict(rank=jnp.array(True))]
    refused += [dict(alpha=jnp.array(True)), dict(alpha=jnp.float32(-1)), dict(alpha="4")]
    for kwargs in refused:
        with pytest.raises(ValueError, match="rank must be|alpha must be"):
            dora_jax.wrap(TWO, **{"rank": 4, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype=jnp.int32), "dtype must be a floating dtype.*int32"),
        (dict(dtype="not-a-dtype"), "dtype must be a floating dtype"),
        (dict(key=0), r"key must be one JAX PRNG key, e.g. key=jax.random.key\(0\).*int 0"),
        (dict(key=jnp.array([0, 1])), "key must be one JAX PRNG key.*int32"),
        (dict(key=jax.random.split(jax.random.key(0))), r"key must be one.*shape \(2,\)"),
    ],
)
def test_a_bad_dtype_or_key_is_refused_naming_the_argument(kwargs, match):
    with pytest.raises(TypeError, match=match):
        dora_jax.wrap(TWO, rank=2, **kwargs)


def test_valid_dtypes_and_keys_still_work():
    typed = dora_jax.wrap(TWO, rank=2, key=jax.random.key(3))["mlp"]["up"]["kernel"]
    raw = dora_jax.wrap(TWO, rank=2, key=jax.random.PRNGKey(3))["mlp"]["up"]["kernel"]
    np.testing.assert_array_equal(typed.a, raw.a)
    for dtype, want in ((None, jnp.float32), ("bfloat16", jnp.bfloat16)):
        assert dora_jax.wrap(TWO, rank=2, dtype=dtype)["mlp"]["up"]["kernel"].a.dtype == want
    with pytest.warns(UserWarning, match="float16 for the trainable leaves.*Adam"):
        half = dora_jax.wrap(TWO, rank=2, dtype=np.float16)
    assert half["mlp"]["up"]["kernel"].a.dtype == jnp.float16
    jitted = jax.jit(lambda k: dora_jax.wrap(TWO, rank=2, key=k))(jax.random.key(3))
    np.testing.assert_allclose(jitted["mlp"]["up"]["kernel"].a, typed.a)


@pytest.mark.parametrize("name", ["rslora", "exact_norm_grad"])
def test_boolean_settings_must_be_bools_not_truthy_values(name):
    for value in ("no", "yes", 1, None):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
            dora_jax.wrap(TWO, rank=2, **{name: value})
        with pytest.raises(TypeError, match=f"{name} must be True or False.*'mlp/up/kernel'"):
            dora_jax.wrap(TWO, rank=2, rules=[("mlp", {name: value})])
    # A numpy bool is a bool: the same node (its static settings are in the treedef).
    node = dora_jax.wrap(TWO, rank=2, **{name: np.bool_(True)})
    want = dora_jax.wrap(TWO, rank=2, **{name: True})
    assert jax.tree.structure(node) == jax.tree.structure(want)
    assert jax.tree.structure(node) != jax.tree.structure(dora_jax.wrap(TWO, rank=2))


def test_axes_keys_that_match_no_leaf_are_warned_of():
    params = {"q": {"kernel": ref.rand(0, 8, 2, 4)}, "o": {"kernel": ref.rand(1, 2, 4, 8)}}
    axes = {"q/kernel": dora_jax.Axes(0, 1), "o/kernel": dora_jax.Axes(0, 2)}
    with pytest.warns(UserWarning, match=r"axes keys \['k_proj'\] match no leaf of params.*"
                      r"regex searched.*'q/kernel'"):  # fmt: skip
        dora_jax.wrap(params, rank=2, axes={**axes, "k_proj": dora_jax.Axes(0, 1)})
    # One axes dict for the model serves any targets: keys of kernels left out are fine.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = dora_jax.wrap(params, rank=2, targets="^q/", axes=axes)
    assert dora_jax.is_adapter(adapted["q"]["kernel"]) and not dora_jax.is_adapter(
        adapted["o"]["kernel"]
    )
    # infer_axes's result names every kernel the model uses, targeted or not: never refused.
    inferred = dora_jax.infer_axes(
        lambda p, x: jnp.einsum("bnh,nhd->bd", jnp.einsum("bd,dnh->bnh", x, p["q"]["kernel"]),
                                p["o"]["kernel"]),
        params, ref.rand(2, 3, 8),
    )  # fmt: skip
    inferred["unused/kernel"] = dora_jax.Axes(0, 1)
    assert dora_jax.is_adapter(dora_jax.wrap(params, rank=2, axes=inferred)["q"]["kernel"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="vera", alpha=16), r"alpha=16, which would be ignored: VeRA has no alpha"),
        (dict(method="dvora", rslora=True), r"rslora=True, which would be ignored: DVoRA"),
        (dict(method="magnitude", alpha=4), r"alpha=4, which would be ignored: a magnitude-only"),
        (dict(method="magnitude", dropout=0.1), r"dropout=0.1, which would be ignored"),
        (dict(method="lora", exact_norm_grad=True), r"exact_norm_grad=True.*LoRA has no norm"),
        (dict(method="vera", rules=[("up", dict(alpha=2))]), r"rules\[0\] \('up'\) sets alpha=2"),
        (
            dict(rules=[("up", dict(method="magnitude", dropout=0.1))]),
            r"rules\[0\] \('up'\) sets dropout=0.1, which would be ignored: a magnitude-only",
        ),
        (
            dict(method="vera", alpha=8, rules=[("up", dict(method="magnitude"))]),
            r"alpha=8.*none of the methods \['magnitude', 'vera'\]",
        ),
    ],
)
def test_a_setting_the_method_does_not_use_is_refused_not_ignored(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dora_jax.wrap(TWO, rank=2, **kwargs)


def test_a_setting_used_by_some_of_the_kernels_methods_is_accepted():
    # alpha goes to the DoRA kernel; the VeRA one has none. Unset options are never refused.
    adapted = dora_jax.wrap(
        TWO, rank=2, method="vera", alpha=8, rules=[("up", dict(method="dora"))]
    )
    assert adapted["mlp"]["up"]["kernel"].scale == 4.0
    assert isinstance(adapted["attn"]["q"]["kernel"], dora_jax.VeRA)
    for method in dora_jax.tree.METHODS:
        dora_jax.wrap(TWO, rank=2, method=method, alpha=None, dropout=0.0, rslora=False)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_float16_adapters_are_warned_of_because_adam_gives_nan(method):
    # The warning's reason, checked: optax's AdamW on float16 adapters gives NaN within a few
    # steps (its eps and small squared gradients are 0 in float16); float32 and bfloat16 do not.
    x = jax.random.normal(jax.random.key(1), (16, 8))

    def trained(dtype):
        adapted = dora_jax.wrap(TWO, rank=2, method=method, dtype=dtype)
        frozen, trainable = dora_jax.partition(adapted)

        def loss(t):
            p = dora_jax.combine(frozen, t)
            y = dora_jax.apply(lambda p, x: x @ p["mlp"]["up"]["kernel"])(p, x)
            return 1e-3 * jnp.mean(y**2)

        tx = optax.adamw(1e-3)
        state = tx.init(trainable)
        for _ in range(3):
            updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        return any(bool(jnp.isnan(leaf).any()) for leaf in jax.tree.leaves(trainable))

    with pytest.warns(UserWarning, match="float16"):
        assert trained(jnp.float16)
    assert not trained(jnp.float32)
    assert not trained(jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_eight_bit_float_adapters_are_refused(dtype):
    with pytest.raises(TypeError, match="8-bit floats cannot hold the small updates"):
        dora_jax.wrap(TWO, rank=2, dtype=dtype)


# --- trees restored without a target: adapter nodes as plain dicts ------------------------


def _adapted_mlp(method):
    _, params, _ = mlp_setup()
    if method == "qdora":
        return dora_jax.quantize_base(perturb(dora_jax.wrap(params, rank=2)), "nf4")
    return perturb(dora_jax.wrap(params, rank=2, method=method, key=jax.random.key(1)))


_NO_TARGET = (
    r"merge got a plain dict at 'fc1/kernel' with the fields of a dora_jax\.{kind}.*"
    r"restored without a target.*jax\.eval_shape.*dora_jax\.checkpoint"
)
_KINDS = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA",
          "magnitude": "Magnitude", "qdora": "DoRA"}  # fmt: skip


@pytest.mark.parametrize("method", list(_KINDS))
def test_a_tree_restored_by_orbax_without_a_target_is_a_clear_error(tmp_path, method):
    import orbax.checkpoint as ocp

    adapted = _adapted_mlp(method)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "adapted", adapted)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "adapted")
        template = jax.eval_shape(lambda: adapted)
        with_target = checkpointer.restore(tmp_path / "adapted", template)
    assert isinstance(restored["fc1"]["kernel"], dict)  # what orbax gives without a target
    with pytest.raises(ValueError, match=_NO_TARGET.format(kind=_KINDS[method])):
        dora_jax.merge(restored)
    with pytest.raises(ValueError, match="partition got a plain dict at 'fc1/kernel'"):
        dora_jax.partition(restored)
    with pytest.raises(ValueError, match="wrap got a plain dict at 'fc1/kernel'"):
        dora_jax.wrap(restored, rank=2)
    equal = np.testing.assert_array_equal
    jax.tree.map(equal, dora_jax.merge(with_target), dora_jax.merge(adapted))


@pytest.mark.parametrize("method", list(_KINDS))
def test_a_tree_from_msgpack_restore_is_a_clear_error(tmp_path, method):
    from flax import serialization

    adapted = _adapted_mlp(method)
    data = serialization.to_bytes(adapted)
    restored = serialization.msgpack_restore(data)  # a quantised base's None offsets dropped
    with pytest.raises(ValueError, match=_NO_TARGET.format(kind=_KINDS[method])):
        dora_jax.merge(restored)
    model, _, x = mlp_setup()
    with pytest.raises(ValueError, match="dora_jax.apply got a plain dict at .*fc1/kernel"):
        dora_jax.apply(model.apply)({"params": restored}, x)
    with pytest.raises(ValueError, match="peft.save got a plain dict at 'fc1/kernel'"):
        dora_jax.peft.save(tmp_path / "peft", restored, name_map=lambda path: path)
    with_target = serialization.from_bytes(adapted, data)
    equal = np.testing.assert_array_equal
    jax.tree.map(equal, dora_jax.merge(with_target), dora_jax.merge(adapted))


@pytest.mark.parametrize("method", list(_KINDS))
def test_a_trainable_half_restored_without_a_target_is_a_clear_error(tmp_path, method):
    # Its dicts hold trainable fields only (no base), so they look like anyone's params;
    # combine, which has the frozen half's nodes beside them, named only the structures.
    import orbax.checkpoint as ocp
    from flax import serialization

    frozen, trainable = dora_jax.partition(_adapted_mlp(method))
    data = serialization.to_bytes(trainable)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "t", trainable)
    with ocp.StandardCheckpointer() as ckpt:
        from_orbax = ckpt.restore(tmp_path / "t")
    for restored in (serialization.msgpack_restore(data), from_orbax):
        with pytest.raises(
            ValueError,
            match=rf"combine got a plain dict at 'fc1/kernel' "
            rf".*dora_jax\.{_KINDS[method]} node.*from_bytes\(template",
        ):
            dora_jax.combine(frozen, restored)
    back = dora_jax.combine(frozen, serialization.from_bytes(trainable, data))
    jax.tree.map(np.testing.assert_array_equal, back, dora_jax.combine(frozen, trainable))


def test_node_dicts_are_found_anywhere_and_other_dicts_pass():
    from dora_jax.tree import check_no_node_dicts

    node = {"base": 0, "a": 1, "b": 2, "magnitude": 3}  # keys only: values are never read
    with pytest.raises(ValueError, match="apply got a plain dict at 'layers/1/q/kernel'.*DoRA"):
        check_no_node_dicts({"layers": [{}, {"q": {"kernel": node}}]}, "apply")
    with pytest.raises(ValueError, match="at 'w'.*dora_jax.QuantizedArray"):
        check_no_node_dicts({"w": {"codes": 0, "scales": 1}}, "merge")
    # A subset or superset of a node's fields is someone's own params.
    check_no_node_dicts({"x": {"a": 1, "b": 2}, "y": {**node, "bias": 4}}, "merge")


def test_submodules_named_like_node_fields_are_not_taken_for_restored_nodes():
    params = {name: {"kernel": jnp.ones((4, 4))} for name in ("a", "b", "base")}
    adapted = dora_jax.wrap(params, rank=2)
    assert all(dora_jax.is_adapter(adapted[name]["kernel"]) for name in params)


def test_no_target_suggestion_says_which_matrices_its_regex_leaves_out():
    # Gemma's weights are 'w' in attention but 'gating_einsum' and 'linear' in its MLP: the
    # regex for the commonest name alone would adapt attention only, without a word.
    gemma_like = {
        "attn": {"q_einsum": {"w": jnp.ones((8, 4))}, "attn_vec_einsum": {"w": jnp.ones((4, 8))}},
        "mlp": {"gating_einsum": jnp.ones((8, 16)), "linear": jnp.ones((16, 8))},
    }
    with pytest.raises(ValueError, match=r"leaves out the matrices named 'gating_einsum' \(1\), "
                       r"'linear' \(1\): name them too") as e:  # fmt: skip
        dora_jax.wrap(gemma_like, rank=2)
    suggested = re.findall(r"targets=r'([^']+)'", str(e.value))[-1]
    adapted = dora_jax.wrap(gemma_like, rank=2, targets=suggested)
    assert len(ref.adapter_nodes(adapted)) == 4


def test_summary_lists_adapted_kernels_those_left_and_the_trainable_share():
    x = jnp.ones((2, 8))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, name="up")(x)
            return nn.DenseGeneral((2, 4), name="q")(x)  # a projection the target misses

    params = Block().init(jax.random.key(0), x)["params"]
    text = dora_jax.summary(dora_jax.wrap(params, rank=2, targets="up"))
    lines = text.splitlines()
    assert lines[0] == "adapted kernels: 1"
    # A (8, 2), B (2, 16), magnitude (16,).
    assert lines[2].split() == ["up/kernel", "DoRA", "2", "(8,", "16)", "-", "|", "0", "64"]
    assert lines[3] == "not adapted, floating with 2 or more axes: 2"
    assert [ln.split()[0] for ln in lines[4:6]] == ["q/bias", "q/kernel"]
    total = 8 * 16 + 16 + 16 * 8 + 8 + 64
    assert lines[-1] == f"trainable: 64 of {total} parameters ({100 * 64 / total:.4g}%)"
    # An NNX module, VeRA (d (4,), b (16,)), magnitude only on a quantised base.
    layer = dora_jax.wrap(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), rank=4, method="vera")
    assert "kernel  VeRA  4     (8, 16)  - | 0       20" in dora_jax.summary(layer)
    quantised = dora_jax.quantize_base(
        dora_jax.wrap(params, method="magnitude", targets="up"), "nf4"
    )
    assert "up/kernel  Magnitude  -     (8, 16)" in dora_jax.summary(quantised)
