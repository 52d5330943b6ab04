"""Kernels of every layout: stack, input and output axes at any positions.

Each case is a tiny model written in plain jnp / lax (torch-layout linear, Gemma's einsums,
a vmap ensemble, scanned torch-layout stacks, conv 1/2/3-D, an embedding with a tied
output). For LoRA, DoRA, VeRA and DVoRA: identity at init, the factored forward
(``strict=True``) equals the merged kernel's forward and the plain-jnp reference, gradients
equal the reference's, jitted and not; the merged kernel's norm over its input axes equals
the magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dora_jax
from dora_jax import Axes
from tests import helpers as ref
from tests.helpers import perturb, rand, ref_params

METHODS = ("lora", "dora", "vera", "dvora")


def conv(x, w, strides, padding, dilation, dn):
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn
    )


def scan_torch(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w.T), None  # w: (out, in), torch layout

    return lax.scan(layer, x, p["w"])[0]


def embed_tied(p, ids):
    h = jnp.tanh(jnp.take(p["embedding"], ids, axis=0))  # lookup: gather over vocab
    return h @ p["embedding"].T  # tied output: contracts the feature axis


# name: (params, fn, input, axes given to wrap, what infer_axes learns)
CASES = {
    "torch_linear": (
        {"w": rand(0, 6, 5)},
        lambda p, x: x @ p["w"].T,
        rand(1, 3, 5),
        Axes((), (1,)),
        Axes((), (1,)),
    ),
    "gemma_q": (
        {"w": rand(0, 2, 5, 3)},
        lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["w"]),
        rand(1, 2, 3, 5),
        Axes.from_einsum("BTD,NDH->BTNH"),
        Axes((), (1,)),
    ),
    "gemma_attn_vec": (
        {"w": rand(0, 2, 3, 5)},
        lambda p, x: jnp.einsum("BTNH,NHD->BTD", x, p["w"]),
        rand(1, 2, 3, 2, 3),
        Axes(0, 2),
        Axes(0, 2),
    ),
    "gemma_kv_joint": (
        {"w": rand(0, 2, 2, 5, 3)},
        lambda p, x: jnp.einsum("BSD,CKDH->CBSKH", x, p["w"]),
        rand(1, 2, 3, 5),
        Axes((), (2,)),
        Axes((), (2,)),
    ),
    "gemma_kv_halves": (
        {"w": rand(0, 2, 2, 5, 3)},
        lambda p, x: jnp.einsum("BSD,CKDH->CBSKH", x, p["w"]),
        rand(1, 2, 3, 5),
        Axes((0,), (2,)),
        Axes((), (2,)),
    ),
    "gemma_gating_joint": (
        {"w": rand(0, 2, 4, 5)},
        lambda p, x: jnp.einsum("...F,NHF->...NH", x, p["w"]),
        rand(1, 2, 3, 5),
        Axes((), (2,)),
        Axes((), (2,)),
    ),
    "gemma_gating_halves": (
        {"w": rand(0, 2, 4, 5)},
        lambda p, x: jnp.einsum("...F,NHF->...NH", x, p["w"]),
        rand(1, 2, 3, 5),
        Axes((0,), (2,)),
        Axes((), (2,)),
    ),
    "vmap_ensemble": (
        {"w": rand(0, 3, 5, 4)},
        lambda p, x: jax.vmap(lambda w: jnp.tanh(x @ w))(p["w"]),
        rand(1, 2, 5),
        Axes(1, 1),
        Axes((), (1,)),
    ),
    "batched_stack_middle": (
        {"w": rand(0, 5, 3, 4)},
        lambda p, x: jnp.einsum("lbi,ilo->lbo", x, p["w"]),
        rand(1, 3, 2, 5),
        Axes((1,), (0,)),
        Axes((1,), (0,)),
    ),
    "scan_torch_layout": (
        {"w": rand(0, 3, 5, 5) * 0.5},
        scan_torch,
        rand(1, 2, 5),
        Axes((0,), (2,)),
        Axes((0,), (2,)),
    ),
    "conv1d": (
        {"w": rand(0, 3, 4, 6)},
        lambda p, x: conv(x, p["w"], (2,), ((2, 1),), (2,), ("NWC", "WIO", "NWC")),
        rand(1, 2, 9, 4),
        Axes((), (0, 1)),
        Axes((), (0, 1)),
    ),
    "conv2d": (
        {"w": rand(0, 3, 2, 4, 6)},
        lambda p, x: conv(x, p["w"], (2, 1), ((1, 2), (0, 1)), (1, 2), ("NHWC", "HWIO", "NHWC")),
        rand(1, 2, 8, 7, 4),
        Axes((), (0, 1, 2)),
        Axes((), (0, 1, 2)),
    ),
    "conv2d_torch": (
        {"w": rand(0, 6, 4, 3, 3)},
        lambda p, x: conv(x, p["w"], (1, 1), "SAME", (1, 1), ("NCHW", "OIHW", "NCHW")),
        rand(1, 2, 4, 6, 6),
        Axes((), (1, 2, 3)),
        Axes((), (1, 2, 3)),
    ),
    "conv3d": (
        {"w": rand(0, 2, 2, 2, 3, 4)},
        lambda p, x: conv(x, p["w"], (1, 2, 1), "VALID", (1, 1, 2), ("NDHWC", "DHWIO", "NDHWC")),
        rand(1, 1, 5, 5, 5, 3),
        Axes((), (0, 1, 2, 3)),
        Axes((), (0, 1, 2, 3)),
    ),
    "embed_tied": (
        {"embedding": rand(0, 10, 5)},
        embed_tied,
        jnp.array([[1, 3, 9], [0, 3, 7]]),
        None,  # a Flax Embed table (vocab, features): input axis vocab, by default
        Axes(0, 1),
    ),
}


def adapt(case, method, perturbed=True):
    params, fn, x, axes, _ = CASES[case]
    name = next(iter(params))
    adapted = dora_jax.wrap(
        params, rank=2, method=method, targets=name, axes=None if axes is None else {name: axes}
    )
    if perturbed:
        frozen, trainable = dora_jax.partition(adapted)
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        leaves = [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
        adapted = dora_jax.combine(frozen, jax.tree.unflatten(treedef, leaves))
    return params, fn, x, adapted, adapted[name]


def close(a, b, tol=2e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_forward_merge_grads(case, method):
    params, fn, x, adapted, node = adapt(case, method)
    expected_axes = CASES[case][3] or Axes(0, 1)
    assert node.axes == expected_axes
    forward = dora_jax.apply(fn, strict=True)

    # Identity at init.
    _, _, _, fresh, _ = adapt(case, method, perturbed=False)
    close(forward(fresh, x), fn(params, x))

    want = fn(ref_params(adapted), x)
    frozen, trainable = dora_jax.partition(adapted)

    def loss(t, f):
        return jnp.sum(jnp.sin(f(dora_jax.combine(frozen, t), x)))

    ref_loss = lambda t, _: jnp.sum(jnp.sin(fn(ref_params(dora_jax.combine(frozen, t)), x)))  # noqa: E731
    ref_grads = jax.grad(ref_loss)(trainable, None)
    for jit in (False, True):
        f = jax.jit(forward) if jit else forward
        close(f(adapted, x), want)
        close(fn(dora_jax.merge(adapted), x), want)
        g = (
            jax.grad(loss)(trainable, f)
            if not jit
            else jax.jit(jax.grad(loss), static_argnums=1)(trainable, f)
        )
        close(g, ref_grads, tol=1e-4)

    if isinstance(node, (dora_jax.DoRA, dora_jax.DVoRA)):
        merged = dora_jax.merge(adapted)[next(iter(params))]
        norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=node.inputs))
        kept = [p for p in range(merged.ndim) if p not in node.inputs]
        norm = jnp.transpose(norm, [kept.index(p) for p in node.stack + node.outputs])
        close(norm, node.magnitude, tol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_infer_axes_learns_every_layout(case):
    params, fn, x, _, learned = CASES[case]
    assert dora_jax.infer_axes(fn, params, x) == {next(iter(params)): learned}


def test_assumed_layout_contracted_on_the_other_axis_is_an_error():
    params = {"w": rand(0, 6, 5)}  # (out, in), torch layout, wrapped without axes
    adapted = dora_jax.wrap(params, rank=2, targets="w")
    assert adapted["w"].assumed_layout
    with pytest.raises(ValueError, match=r"'w'.*Axes\(stack=\(\), inputs=\(1,\)\).*from_einsum"):
        dora_jax.apply(lambda p, x: x @ p["w"].T)(adapted, rand(1, 3, 5))
    # Given explicitly as (in, out), the same use is W' transposed (a tied decoder).
    for method in METHODS:
        explicit = dora_jax.wrap(params, rank=2, method=method, targets="w", axes={"w": Axes(0, 1)})
        explicit = jax.tree.map(lambda v: v + 0.3, explicit)  # away from the identity init
        fn = lambda p, x: x @ p["w"].T  # noqa: E731
        x = rand(1, 3, 5)
        close(dora_jax.apply(fn, strict=True)(explicit, x), fn(ref_params(explicit), x))


def test_wrong_axes_on_any_layout_are_an_error():
    params = {"w": rand(0, 2, 5, 3)}
    adapted = dora_jax.wrap(params, rank=2, targets="w", axes={"w": Axes(0, 1)})
    with pytest.raises(ValueError, match="inputs=\\(1,\\)"):
        dora_jax.apply(lambda p, x: jnp.einsum("BD,NDH->BNH", x, p["w"]))(adapted, rand(1, 3, 5))


def test_infer_axes_skips_vectors_and_cannot_tell_error_shows_einsum():
    params = {"w": rand(0, 5, 4), "bias": rand(1, 4)[0]}
    axes = dora_jax.infer_axes(lambda p, x: x @ p["w"] + p["bias"], params, rand(2, 3, 5))
    assert axes == {"w": Axes(0, 1)}
    with pytest.raises(ValueError, match="from_einsum"):
        dora_jax.wrap({"w": rand(0, 2, 5, 3)}, rank=2, targets="w")


def test_infer_axes_names_kernels_it_could_not_read_and_wrap_says_why():
    # A kernel reshaped before its contraction (Keras's depthwise conv reshapes its kernel).
    params = {"k": rand(0, 5, 2, 3), "w": rand(1, 6, 5)}

    def fn(p, x):
        return jnp.dot(x, p["k"].reshape(5, 6)) @ p["w"]

    axes = dora_jax.infer_axes(fn, params, rand(2, 3, 5))
    assert axes == {"w": Axes(0, 1)} and axes.unread == {"k": ("reshape",)}
    with pytest.raises(ValueError, match=r"infer_axes could not read them.*`reshape`"):
        dora_jax.wrap(params, rank=2, targets="k|w", axes=axes)
    # Given by hand, the kernel is adapted; apply forms W' for the reshape and says so.
    adapted = dora_jax.wrap(params, rank=2, targets="k|w", axes={**axes, "k": Axes(0, 1)})
    with pytest.warns(dora_jax.FallbackWarning, match="'k'"):
        y = dora_jax.apply(fn)(adapted, rand(2, 3, 5))
    np.testing.assert_allclose(y, fn(dora_jax.merge(adapted), rand(2, 3, 5)), rtol=1e-5)


@pytest.mark.parametrize(
    "lookup",
    [
        lambda w, ids: w[ids],
        lambda w, ids: jnp.take(w, ids, axis=0),
        # Equinox's Embedding looks up one token, vmapped: a gather of a (1, features) slice.
        lambda w, ids: jax.vmap(jax.vmap(lambda i: w[i]))(ids),
    ],
    ids=["index", "take", "vmapped"],
)
def test_every_form_of_a_tied_lookup_is_read_and_factored(lookup):
    # A tied table: looked up, then contracted over its features for the logits. The
    # vocabulary axis is its input axis (a magnitude per feature), whatever the lookup's form.
    params, ids = {"weight": rand(0, 32, 16)}, jnp.array([[1, 5, 7, 31], [0, 2, 2, 9]])

    def fn(p, ids):
        return jnp.tanh(lookup(p["weight"], ids)) @ p["weight"].T

    axes = dora_jax.infer_axes(fn, params, ids)
    assert axes == {"weight": Axes((), (0,))} and not axes.unread
    adapted = perturb(dora_jax.wrap(params, rank=2, targets="weight", axes=axes))
    assert adapted["weight"].magnitude.shape == (16,)

    def loss(a, forward):
        return jnp.sum(jnp.sin(forward(a, ids)))

    value, grads = jax.value_and_grad(loss)(adapted, dora_jax.apply(fn, strict=True))
    want, want_grads = jax.value_and_grad(lambda a: loss(ref_params(a), fn))(adapted)
    close(value, want)
    for name in ("a", "b", "magnitude"):
        close(getattr(grads["weight"], name), getattr(want_grads["weight"], name))


def test_a_lookup_of_part_of_a_row_is_unread_and_a_2d_kernel_is_not_assumed():
    # Only the first 8 features are looked up: not a whole-row lookup, so the tied use
    # alone cannot tell the table's axes; wrap says so rather than assume (in, out).
    params, ids = {"weight": rand(0, 32, 16)}, jnp.array([1, 5])
    axes = dora_jax.infer_axes(lambda p, i: p["weight"][i, :8] @ p["weight"][:, :8].T, params, ids)
    assert axes == {} and axes.unread == {"weight": ("gather",)}
    with pytest.raises(ValueError, match=r"could not read them.*`gather`"):
        dora_jax.wrap(params, rank=2, targets="weight", axes=axes)


def _gating_reference(node, x):
    """Gemma's gate and up halves from the formula on the kernel read as (D, 2 * H)."""
    v = node.base.transpose(1, 0, 2).reshape(5, 12)
    if hasattr(node, "a"):
        v = v + ref.lora_delta(node.a, node.b.reshape(-1, 12), node.scale)
    if hasattr(node, "magnitude"):
        v = ref.decompose(v, node.magnitude.reshape(12))
    w = v.reshape(5, 2, 6).transpose(1, 0, 2)
    return jax.nn.gelu(x @ w[0]) * (x @ w[1])


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude"])
def test_slices_of_output_and_stack_axes_stay_factored(method):
    # Gemma's FeedForward: jnp.dot(x, w_gating[0]), jnp.dot(x, w_gating[1]).
    def gating(p, x):
        return jax.nn.gelu(jnp.dot(x, p["g"][0])) * jnp.dot(x, p["g"][1])

    x = rand(2, 3, 5)
    params = {"g": rand(0, 2, 5, 6)}
    axes = dora_jax.infer_axes(gating, params, x)
    assert axes == {"g": Axes((0,), (1,))} and not axes.unread  # gate and up: two matrices
    as_read = perturb(dora_jax.wrap(params, rank=2, method=method, targets="g", axes=axes),
                      size=0.3)  # fmt: skip
    assert as_read["g"].axes == Axes((0,), (1,))
    _matches_reference(gating, as_read, x)
    # Given by hand, axis 0 as output columns: one adapter over both halves.
    adapted = perturb(dora_jax.wrap(params, rank=2, method=method, targets="g",
                                    axes={"g": Axes((), (1,))}), size=0.3)  # fmt: skip
    node = adapted["g"]
    loss = lambda n: jnp.sum(jnp.sin(dora_jax.apply(gating, strict=True)({"g": n}, x)))
    ref_loss = lambda n: jnp.sum(jnp.sin(_gating_reference(n, x)))
    for f in (jax.value_and_grad(loss), jax.jit(jax.value_and_grad(loss))):
        (value, g), (rl, rg) = f(node), jax.value_and_grad(ref_loss)(node)
        np.testing.assert_allclose(value, rl, rtol=1e-5)
        for name in type(node).trainable:
            np.testing.assert_allclose(getattr(g, name), getattr(rg, name), rtol=1e-4,
                                       atol=1e-5, err_msg=name)  # fmt: skip

    # A Python loop over a stacked kernel, w[i]: one adapter per layer.
    stacked = perturb(dora_jax.wrap({"w": rand(3, 3, 5, 5)}, rank=2, method=method, targets="w",
                                  axes={"w": Axes((0,), (1,))}), size=0.3)  # fmt: skip

    def layers(p, h):
        for i in range(3):
            h = jnp.tanh(h @ p["w"][i])
        return h

    y = dora_jax.apply(layers, strict=True)(stacked, x)
    np.testing.assert_allclose(y, layers(dora_jax.merge(stacked), x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_fori_loop_over_a_stacked_kernel_stays_factored(method):
    # w[i] with a traced i is a dynamic_slice of the stack axis: each field is cut alike.
    params, x = {"w": rand(0, 3, 16, 16)}, rand(1, 5, 16)

    def fn(p, x):
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)

    adapted = perturb(
        dora_jax.wrap(params, rank=2, method=method, targets="w", axes={"w": Axes((0,), (1,))})
    )

    def loss(a, forward):
        return jnp.sum(jnp.sin(forward(a, x)))

    for jit in (False, True):
        f = jax.value_and_grad(loss)
        value, grads = (jax.jit(f, static_argnums=1) if jit else f)(
            adapted, dora_jax.apply(fn, strict=True)
        )
        want, want_grads = jax.value_and_grad(lambda a: loss(ref_params(a), fn))(adapted)
        close(value, want)
        for name in type(adapted["w"]).trainable:
            close(getattr(grads["w"], name), getattr(want_grads["w"], name))


def test_a_slice_the_factored_forward_cannot_cut_forms_the_kernel():
    # An input-axis slice (the norm sums over it) and VeRA's shared matrices: W', warned.
    x = rand(2, 3, 3)
    adapted = dora_jax.wrap({"w": rand(0, 5, 4)}, rank=2, targets="w")
    fn = lambda p, x: x @ p["w"][:3]  # noqa: E731
    with pytest.warns(dora_jax.FallbackWarning, match="`slice`"):
        y = dora_jax.apply(fn)(adapted, x)
    np.testing.assert_allclose(y, fn(dora_jax.merge(adapted), x), rtol=1e-5)
    vera = dora_jax.wrap({"g": rand(0, 2, 5, 6)}, rank=4, method="vera", targets="g",
                         axes={"g": Axes((), (1,))})  # fmt: skip
    with pytest.warns(dora_jax.FallbackWarning):
        dora_jax.apply(lambda p, x: x @ p["g"][0])(vera, rand(2, 3, 5))


def test_strict_message_says_the_use_is_not_covered():
    adapted = dora_jax.wrap({"w": rand(0, 5, 4)}, rank=2, targets="w")
    with pytest.raises(ValueError, match="does not cover"):
        dora_jax.apply(lambda p: jnp.sum(p["w"]), strict=True)(adapted)


def test_nested_jit_stays_a_jit_and_returned_nodes_survive():
    adapted = dora_jax.wrap({"w": rand(0, 5, 4)}, rank=2, targets="w")

    @jax.jit
    def inner(w, x):
        return x @ w

    def fn(p, x):
        return inner(p["w"], x), p["w"]

    x = rand(1, 3, 5)
    jaxpr = jax.make_jaxpr(dora_jax.apply(fn, strict=True))(adapted, x)
    names = [e.params.get("name") for e in jaxpr.jaxpr.eqns if e.primitive.name == "jit"]
    assert "inner" in names
    y, node = dora_jax.apply(fn, strict=True)(adapted, x)
    assert node is adapted["w"]
    close(y, x @ dora_jax.merge(adapted)["w"])


def test_sharding_and_quantised_base_follow_the_layout():
    from jax.sharding import PartitionSpec as P

    params = {"proj": {"kernel": rand(0, 8, 6)}}  # (out, in)
    adapted = dora_jax.wrap(params, rank=2, axes={"proj": Axes((), (1,))})
    specs = dora_jax.sharding.param_specs(adapted, rules=(("proj", P("tensor", "fsdp")),))
    node = specs["proj"]["kernel"]
    assert node.a == P("fsdp", None) and node.b == P(None, "tensor")
    assert node.magnitude == P("tensor")

    q = dora_jax.quantize(params["proj"]["kernel"], "int8", block=None, inputs=(1,))
    assert q.shape == (8, 6)
    close(q.dequantize(), params["proj"]["kernel"], tol=0.05)
    quantised = dora_jax.quantize_base(adapted, "int8", block=None)
    x = rand(1, 3, 6)
    fn = lambda p, x: x @ p["proj"]["kernel"].T  # noqa: E731
    close(dora_jax.apply(fn, strict=True)(quantised, x), fn(dora_jax.merge(quantised), x))


def _matches_reference(fn, adapted, x):
    """``apply(fn, strict=True)`` equals the plain-jnp reference on W', values and
    gradients of every trainable leaf, jitted and not."""
    frozen, trainable = dora_jax.partition(adapted)
    forward = dora_jax.apply(fn, strict=True)

    def loss(t, f):
        return jnp.sum(jnp.sin(f(dora_jax.combine(frozen, t), x)))

    want, want_grads = jax.value_and_grad(lambda t: loss(t, lambda a, x: fn(ref_params(a), x)))(
        trainable
    )
    for jit in (False, True):
        f = jax.value_and_grad(loss)
        value, grads = (jax.jit(f, static_argnums=1) if jit else f)(trainable, forward)
        close(value, want, tol=1e-4)
        close(grads, want_grads, tol=1e-4)


def _conv_transpose_flipped(p, x):
    # Keras's Conv2DTranspose, Linen's ConvTranspose(transpose_kernel=True): the kernel
    # (kh, kw, out, in) has its window flipped and in / out swapped before the convolution.
    w = jnp.swapaxes(jnp.flip(p["w"], (0, 1)), 2, 3)
    return conv(x, w, (1, 1), ((2, 1), (1, 2)), (1, 1), ("NHWC", "HWIO", "NHWC"))


# name: (params, fn, input, axes the kernel has; infer_axes learns them)
FLIPPED = {
    "conv_transpose": ({"w": rand(0, 3, 2, 4, 3)}, _conv_transpose_flipped, rand(1, 2, 5, 6, 3),
                       Axes((), (0, 1, 3))),
    "inputs": ({"w": rand(0, 5, 4)}, lambda p, x: x @ p["w"][::-1], rand(1, 3, 5), Axes(0, 1)),
    "outputs": ({"w": rand(0, 5, 4)}, lambda p, x: x @ p["w"][:, ::-1], rand(1, 3, 5),
                Axes(0, 1)),
    "stack": ({"w": rand(0, 3, 5, 4)},
              lambda p, x: jnp.einsum("lbi,lio->lbo", x, jnp.flip(p["w"], 0)),
              rand(1, 3, 2, 5), Axes((0,), (1,))),
}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(FLIPPED))
def test_a_flipped_kernel_is_read_and_stays_factored(case, method):
    params, fn, x, axes = FLIPPED[case]
    learned = dora_jax.infer_axes(fn, params, x)
    assert learned == {"w": axes} and not learned.unread
    adapted = perturb(
        dora_jax.wrap(params, rank=2, method=method, targets="w", axes=learned), size=0.3
    )
    if method in ("vera", "dvora") and case != "stack":
        # VeRA's shared matrices span the input and output axes: W' is formed, and said.
        with pytest.warns(dora_jax.FallbackWarning, match="`rev`"):
            y = dora_jax.apply(fn)(adapted, x)
        close(y, fn(ref_params(adapted), x), tol=1e-4)
        return
    _matches_reference(fn, adapted, x)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_lookup_through_a_transposed_table_stays_factored(method):
    # penzai's Embedder looks up its (vocab, features) table through a transposed view.
    params, ids = {"emb": rand(0, 11, 6)}, jnp.array([[1, 2, 3], [10, 0, 3]])

    def fn(p, ids):
        return jnp.tanh(p["emb"].T[:, ids])  # (features, *ids.shape)

    axes = dora_jax.infer_axes(fn, params, ids)
    assert axes == {"emb": Axes((), (0,))} and not axes.unread
    _matches_reference(
        fn, perturb(dora_jax.wrap(params, rank=2, method=method, targets="emb"), size=0.3), ids
    )


@pytest.mark.parametrize("method", METHODS)
def test_a_scan_over_a_stack_axis_that_is_not_axis_0_stays_factored(method):
    # Linen's nn.scan(..., variable_axes={'params': 1}) scans jnp.moveaxis(w, 1, 0).
    params, x = {"w": rand(0, 5, 3, 5) * 0.5}, rand(1, 2, 5)

    def fn(p, x):
        layer = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return lax.scan(layer, x, jnp.moveaxis(p["w"], 1, 0))[0]

    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {"w": Axes((1,), (0,))} and not axes.unread
    adapted = perturb(
        dora_jax.wrap(params, rank=2, method=method, targets="w", axes=axes), size=0.3
    )
    _matches_reference(fn, adapted, x)


def test_a_grouped_conv_forms_the_kernel_and_says_why():
    params, x = {"w": rand(0, 3, 3, 1, 4)}, rand(1, 2, 5, 5, 4)  # depthwise: 4 groups

    def fn(p, x):
        return lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", feature_group_count=4,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    adapted = perturb(
        dora_jax.wrap(params, rank=2, targets="w", axes={"w": Axes((), (0, 1, 2))}), size=0.3
    )
    with pytest.raises(ValueError, match=r"grouped convolution \(feature_group_count=4\)") as info:
        dora_jax.apply(fn, strict=True)(adapted, x)
    assert "dot_general, conv)" not in str(info.value)
    with pytest.warns(dora_jax.FallbackWarning, match="grouped convolution"):
        y = dora_jax.apply(fn)(adapted, x)
    close(y, fn(ref_params(adapted), x), tol=1e-4)


@pytest.mark.parametrize("take", ["slice", "dynamic_slice"])
def test_a_sliced_table_left_unread_names_the_slice(take):
    # GPT-2's position table (keras_hub): its first rows sliced, then broadcast onto the
    # token embeddings. infer_axes and wrap name the slice too, not only the broadcast.
    params, x = {"pos": rand(0, 16, 4)}, rand(1, 2, 6, 4)

    def fn(p, x):
        rows = p["pos"][:6] if take == "slice" else lax.dynamic_slice_in_dim(p["pos"], 0, 6)
        return x + rows

    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {} and take in axes.unread["pos"]
    with pytest.raises(ValueError, match=rf"could not read them.*`{take}`"):
        dora_jax.wrap(params, rank=2, targets="pos", axes=axes)
    # A slice on the way to a contraction that reads the kernel is not named.
    read = dora_jax.infer_axes(lambda p, x: x @ p["pos"][:, :3], params, rand(2, 5, 16))
    assert read == {"pos": Axes(0, 1)} and not read.unread


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_dead_use_of_a_kernel_is_neither_read_nor_formed(method):
    # haliax's scan takes layer 0 of every stacked leaf only for its structure: that take
    # was read as a lookup over the layer axis ("used in inconsistent ways"), and apply
    # formed W' for it.
    params, x = {"w": rand(0, 3, 16, 16)}, rand(1, 4, 16)

    def fn(p, x):
        jnp.take(p["w"], 0, axis=0)  # dead
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {"w": Axes((0,), (1,))} and not axes.unread
    adapted = perturb(dora_jax.wrap(params, rank=2, method=method, targets="w", axes=axes))
    out = jax.jit(dora_jax.apply(fn, strict=True))(adapted, x)
    close(out, fn(ref_params(adapted), x))


def _take_loop(p, x):
    h = x
    for i in range(3):
        h = jnp.tanh(h @ jnp.take(p["w"], i, axis=0))  # a gather of one layer
    return h


def _index_loop(p, x):
    h = x
    for i in range(3):
        h = jnp.tanh(h @ p["w"][i])  # slice and squeeze
    return h


def _fori_loop(p, x):
    return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)  # dynamic_slice


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_layer_taken_from_a_stack_is_not_read_as_a_lookup(method):
    # haliax's hax.take / NamedArray layer indexing lowers to jnp.take(w, i, axis=0): a
    # gather of one slice. It was read as an embedding lookup over the LAYER axis, and DoRA
    # then normed over the layers, silently. Its axes are now those of w[i], and apply cuts
    # the node's fields along the taken axis. The layer axis is a stack axis in all three
    # forms (one adapter per layer; it was an output axis: one A over all layers).
    params, x = {"w": rand(0, 3, 16, 16) * 0.5}, rand(1, 4, 16)
    forms = {f: dora_jax.infer_axes(f, params, x) for f in (_take_loop, _index_loop, _fori_loop)}
    for axes in forms.values():
        assert axes == {"w": Axes((0,), (1,))} and not axes.unread
    for axes in (forms[_take_loop], {"w": Axes((), (1,))}):  # as read; one A, by hand
        adapted = perturb(
            dora_jax.wrap(params, rank=2, method=method, targets="w", axes=axes), size=0.3
        )
        _matches_reference(_take_loop, adapted, x)
    # A taken input axis (rows of a table) is not cut: W' is formed for it, and said so.
    adapted = dora_jax.wrap(params, rank=2, method=method, targets="w",
                            axes={"w": Axes((), (0,))})  # fmt: skip
    with pytest.warns(dora_jax.FallbackWarning, match="`gather`"):
        dora_jax.apply(lambda p, x: x @ jnp.take(p["w"], 1, axis=0))(adapted, x)


def _middle_pick(p, x):  # a fused (in, 3, out) kernel used one slice at a time
    return sum(jnp.tanh(x @ p["w"][:, i]) for i in range(3))


@pytest.mark.parametrize("method", ["vera", "dvora"])
@pytest.mark.parametrize("fn", [_take_loop, _index_loop, _fori_loop, _middle_pick])
def test_vera_layers_taken_from_a_stack_stay_factored(method, fn):
    # Their shared matrices span no stack axis, so a stack axis is cut like LoRA's: each
    # layer's d, b (and magnitude). W' was formed for every such use (strict: an error).
    w = rand(0, 16, 3, 16) if fn is _middle_pick else rand(0, 3, 16, 16)
    params, x = {"w": w * 0.5}, rand(1, 4, 16)
    axes = dora_jax.infer_axes(fn, params, x)
    # A later axis picked is read as an output axis (a quantised base needs its stack axes
    # first); given as a stack axis by hand, it is cut like a leading one.
    assert axes == {"w": Axes((), (0,)) if fn is _middle_pick else Axes((0,), (1,))}
    if fn is _middle_pick:
        assert dora_jax.quantize_base(dora_jax.wrap(params, rank=4, targets="w", axes=axes),
                                      "nf4")  # fmt: skip
        axes = {"w": Axes((1,), (0,))}
    adapted = perturb(dora_jax.wrap(params, rank=4, method=method, targets="w", axes=axes),
                      size=0.3)  # fmt: skip
    _matches_reference(fn, adapted, x)


def test_a_lookup_of_token_ids_with_take_is_still_a_lookup():
    params = {"table": rand(0, 32, 8)}
    for ids in (jnp.array([[1, 5, 7], [0, 2, 31]]), jnp.array([[3], [4]])):  # decode: (b, 1)
        axes = dora_jax.infer_axes(lambda p, i: jnp.take(p["table"], i, axis=0), params, ids)
        assert axes == {"table": Axes((), (0,))} and not axes.unread
    # A row looked up by a scalar id is a lookup in apply (the taken axis is its input).
    adapted = perturb(dora_jax.wrap(params, rank=2, targets="table", axes=axes), size=0.3)
    fn = lambda p, i: jnp.tanh(jnp.take(p["table"], i, axis=0))  # noqa: E731
    close(dora_jax.apply(fn, strict=True)(adapted, 5), fn(ref_params(adapted), 5))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_kernel_times_a_scalar_is_read_and_stays_factored(method):
    # gemma3n's Einsum(w_scale=...): jnp.einsum(eqn, x, w * w_scale). The kernel was listed
    # as unread ('mul') and said to be "not a kernel".
    params, x = {"w": rand(0, 16, 2, 4)}, rand(1, 3, 16)

    def fn(p, x):
        return jnp.einsum("td,dnh->tnh", x, p["w"] * 16**-0.5)

    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {"w": Axes((), (0,))} and not axes.unread
    adapted = perturb(dora_jax.wrap(params, rank=2, method=method, targets="w", axes=axes))
    _matches_reference(fn, adapted, x)
    # A traced factor, from an input that is differentiated; a looked-up table scaled too.
    two_d, v = {"kernel": rand(2, 16, 16), "table": rand(3, 32, 16)}, rand(4, 4, 16)
    ids = jnp.array([1, 5, 7, 31])

    def scaled(p, x, c):
        return jnp.tanh(x @ (p["kernel"] * c)) @ (c / 2 * p["kernel"]) + (p["table"] / c)[ids]

    axes = dora_jax.infer_axes(scaled, two_d, v, 0.5)
    assert axes == {"kernel": Axes(0, 1), "table": Axes(0, 1)} and not axes.unread
    adapted = perturb(dora_jax.wrap(two_d, rank=2, method=method, targets="kernel|table"),
                      size=0.3)  # fmt: skip
    loss = lambda a, c, f: jnp.sum(jnp.sin(f(a, v, c)))  # noqa: E731
    want = jax.value_and_grad(lambda a, c: loss(ref_params(a), c, scaled), (0, 1))(adapted, 0.7)
    for jit in (False, True):
        f = jax.value_and_grad(loss, (0, 1))
        value, grads = (jax.jit(f, static_argnums=2) if jit else f)(
            adapted, 0.7, dora_jax.apply(scaled, strict=True)
        )
        close(value, want[0], tol=1e-4)
        close(grads[1], want[1][1], tol=1e-4)  # the factor's
        for name, node in grads[0].items():
            for leaf in type(node).trainable:
                close(getattr(node, leaf), getattr(want[1][0][name], leaf), tol=1e-4)


def test_a_kernel_times_an_array_is_read_but_formed():
    # A mask of the kernel's shape: the contraction after it still tells the axes (not
    # "not a kernel"); apply forms W' for the product and says so.
    params, x = {"w": rand(0, 16, 8)}, rand(1, 3, 16)
    mask = (rand(2, 16, 8) > 0).astype(jnp.float32)
    fn = lambda p, x: x @ (p["w"] * mask)  # noqa: E731
    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {"w": Axes(0, 1)} and not axes.unread
    adapted = perturb(dora_jax.wrap(params, rank=2, targets="w", axes=axes))
    with pytest.warns(dora_jax.FallbackWarning, match="`mul`"):
        close(dora_jax.apply(fn)(adapted, x), fn(ref_params(adapted), x))
