"""apply/merge against plain-jnp references on Linen, NNX, plain functions and scan stacks."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import dora_jax
from tests.helpers import MLP, assert_trees_close, perturb, ref_params


def maybe_jit(f, jit):
    return jax.jit(f) if jit else f


def mlp_reference(p, x):
    # The MLP written by hand, so the reference does not go through Flax at all.
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((3, 4), name="query")(x)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(jnp.sin(q))


def attention_reference(p, x):
    q = jnp.einsum("bti,ihd->bthd", x, p["query"]["kernel"]) + p["query"]["bias"]
    return jnp.einsum("bthd,hdo->bto", jnp.sin(q), p["out"]["kernel"]) + p["out"]["bias"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(x.shape[-1])(x)), None


class Stack(nn.Module):
    remat: bool = True

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def stack_reference(p, x):
    k, b = p["layers"]["Dense_0"]["kernel"], p["layers"]["Dense_0"]["bias"]
    for i in range(k.shape[0]):
        x = jnp.tanh(x @ k[i] + b[i])
    return x


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(42), (2, 7, 12))


# --- forward, merge and gradients against the reference ----------------------------------

CASES = {
    "linen_dense": (MLP, mlp_reference, None),
    "linen_dense_general": (Attention, attention_reference, "infer"),
    "linen_scan_remat": (Stack, stack_reference, {"layers": dora_jax.Axes(1, 1)}),
}


def build(case, x, method="dora", rank=3, exact=False):
    module_cls, reference_fn, axes = CASES[case]
    model = module_cls()
    params = model.init(jax.random.key(0), x)["params"]
    if axes == "infer":
        axes = dora_jax.infer_axes(lambda p, x: model.apply({"params": p}, x), params, x)
    adapted = dora_jax.wrap(params, rank=rank, method=method, axes=axes, exact_norm_grad=exact)
    return model, reference_fn, params, perturb(adapted)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method", ["dora", "lora", "vera", "dvora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_merge_match_reference(case, method, jit, x):
    model, reference_fn, _, adapted = build(case, x, method)
    expected = reference_fn(ref_params(adapted), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dora_jax.FallbackWarning)
        got = maybe_jit(dora_jax.apply(model.apply), jit)({"params": adapted}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    merged = dora_jax.merge(adapted)
    np.testing.assert_allclose(model.apply({"params": merged}, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "method,exact", [("dora", False), ("dora", True), ("dvora", False), ("dvora", True),
                     ("lora", False), ("vera", False)]
)  # fmt: skip
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_reference(case, method, exact, jit, x):
    model, reference_fn, _, adapted = build(case, x, method=method, exact=exact)
    frozen, trainable = dora_jax.partition(adapted)

    def loss(trainable):
        y = dora_jax.apply(model.apply)({"params": dora_jax.combine(frozen, trainable)}, x)
        return jnp.mean(jnp.sin(3.0 * y))

    def loss_ref(trainable):
        p = ref_params(dora_jax.combine(frozen, trainable), exact=exact)
        return jnp.mean(jnp.sin(3.0 * reference_fn(p, x)))

    got = maybe_jit(jax.grad(loss), jit)(trainable)
    expected = jax.grad(loss_ref)(trainable)
    assert_trees_close(got, expected, rtol=1e-4, atol=1e-6)


def test_plain_function_and_vmap_stack(x):
    """A function of a plain dict, with a vmapped (batched dot_general) stacked kernel."""
    key = jax.random.key(1)
    params = {
        "proj": {"kernel": jax.random.normal(key, (12, 6))},
        "stacked": {"kernel": jax.random.normal(key, (4, 6, 6))},
    }

    def f(p, x):
        h = x @ p["proj"]["kernel"]
        h = jnp.broadcast_to(h, (4, *h.shape))
        return jnp.einsum("lbti,lio->lbto", h, p["stacked"]["kernel"])

    axes = dora_jax.infer_axes(f, params, x)
    assert axes == {"proj/kernel": dora_jax.Axes(0, 1), "stacked/kernel": dora_jax.Axes(1, 1)}
    adapted = perturb(dora_jax.wrap(params, rank=2, axes=axes))
    expected = f(ref_params(adapted), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dora_jax.FallbackWarning)
        for jit in (False, True):
            got = maybe_jit(dora_jax.apply(f), jit)(adapted, x)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(12, 12, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, x):
            return block(x)

        return step(self.blocks, x)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method", ["dora", "dvora"])
@pytest.mark.parametrize("module_cls", [NNXMLP, NNXStack])
def test_nnx(module_cls, method, jit, x):
    graphdef, state = nnx.split(module_cls(nnx.Rngs(0)))

    def f(state, x):
        return nnx.merge(graphdef, state)(x)

    axes = dora_jax.infer_axes(f, state, x)
    adapted = perturb(dora_jax.wrap(state, rank=3, method=method, axes=axes))
    assert isinstance(adapted, nnx.State)
    expected = f(ref_params(adapted), x)
    frozen, trainable = dora_jax.partition(adapted)

    def make_loss(fn):
        return lambda trainable: jnp.sum(jnp.sin(fn(dora_jax.combine(frozen, trainable), x)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", dora_jax.FallbackWarning)
        got = maybe_jit(dora_jax.apply(f), jit)(adapted, x)
        grads = maybe_jit(jax.grad(make_loss(dora_jax.apply(f))), jit)(trainable)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f(dora_jax.merge(adapted), x), expected, rtol=1e-5, atol=1e-5)
    expected_grads = jax.grad(make_loss(lambda s, x: f(ref_params(s), x)))(trainable)
    assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_bf16_base(x):
    """bf16 kernels and compute: the norm is taken in float32, outputs within bf16 error."""

    class BF16MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
            return nn.Dense(5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(jnp.tanh(h))

    model = BF16MLP()
    params = model.init(jax.random.key(0), x)["params"]
    adapted = perturb(dora_jax.wrap(params, rank=4))
    node = adapted["Dense_0"]["kernel"]
    assert node.base.dtype == jnp.bfloat16 and node.a.dtype == jnp.float32
    assert node.magnitude.dtype == jnp.float32
    direct = node.base.astype(jnp.float32) + node.scale * node.a @ node.b
    np.testing.assert_allclose(node.weight_norm(), jnp.linalg.norm(direct, axis=0), rtol=1e-5)
    expected = model.apply({"params": ref_params(adapted)}, x)
    got = jax.jit(dora_jax.apply(model.apply))({"params": adapted}, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.float32), atol=5e-2)
    merged = dora_jax.merge(adapted)
    assert jax.tree.map(lambda a: a.dtype, merged) == jax.tree.map(lambda a: a.dtype, params)


def test_exact_norm_grad_changes_direction_gradients(x):
    """The option matters: A and B gradients differ, the magnitude gradient does not."""
    grads = {}
    for exact in (False, True):
        model, _, _, adapted = build("linen_dense", x, exact=exact)
        frozen, trainable = dora_jax.partition(adapted)
        fn = dora_jax.apply(model.apply)

        def loss(t, fn=fn, frozen=frozen):
            return jnp.sum(fn({"params": dora_jax.combine(frozen, t)}, x) ** 2)

        grads[exact] = jax.grad(loss)(trainable)["fc1"]["kernel"]
    assert not np.allclose(grads[False].a, grads[True].a, rtol=1e-3)
    np.testing.assert_allclose(grads[False].magnitude, grads[True].magnitude, rtol=1e-5)


def test_vmap_over_an_adapted_stack_is_a_clear_error_and_vmap_inside_works():
    # jax.vmap over the adapted tree slices every field along the stack axis the node
    # still counts; inside the function the stack axis is followed.
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 8))}}
    x = jax.random.normal(jax.random.key(1), (5, 16))
    adapted = perturb(dora_jax.wrap(params, rank=2, axes={"w/kernel": dora_jax.Axes(1, 1)}))
    f = lambda p, x: jnp.tanh(x @ p["w"]["kernel"])  # noqa: E731
    with pytest.raises(ValueError, match=r"'w/kernel'.*do not fit its axes.*jax.vmap"):
        jax.vmap(dora_jax.apply(f), in_axes=(0, None))(adapted, x)
    inside = lambda p, x: jax.vmap(lambda k: jnp.tanh(x @ k))(p["w"]["kernel"])  # noqa: E731
    y = dora_jax.apply(inside, strict=True)(adapted, x)
    np.testing.assert_allclose(y, inside(ref_params(adapted), x), rtol=1e-5, atol=1e-6)


def _relative_error(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(
    "use, kernel_dtype",  # jnp refuses x_f32 @ w_float8 (no implicit promotion of float8)
    [("matmul", jnp.bfloat16), ("dot_general", jnp.bfloat16), ("transposed", jnp.bfloat16),
     ("dot_general", jnp.float8_e4m3fn), ("transposed", jnp.float8_e4m3fn)],
)  # fmt: skip
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mixed_dtype_contraction_keeps_the_low_rank_branch_in_its_compute_dtype(
    method, use, kernel_dtype
):
    """``x_f32 @ w_bf16`` casts neither operand in the jaxpr and computes in float32: the
    float32 A and s B must not be rounded to the kernel's storage dtype (bf16, float8)."""
    w = (0.2 * jax.random.normal(jax.random.key(0), (32, 16))).astype(kernel_dtype)
    x = jax.random.normal(jax.random.key(1), (8, 16 if use == "transposed" else 32))
    adapted = perturb(
        dora_jax.wrap(
            {"w": w}, rank=4, method=method, targets="w", axes={"w": dora_jax.Axes((), (0,))}
        )
    )
    fns = {
        "matmul": lambda p, x: x @ p["w"],
        "dot_general": lambda p, x: lax.dot_general(
            x, p["w"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        ),
        "transposed": lambda p, x: lax.dot_general(  # a tied embedding's attend, h W'^T
            x, p["w"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ),
    }
    f = fns[use]
    # W' in float32 from the node's own leaves (the stored base values are exact in f32).
    node = adapted["w"]
    v = node.base.astype(jnp.float32) + node.scale * node.a @ node.b
    if method == "dora":
        v = node.magnitude * v / jnp.linalg.norm(v, axis=0)
    expected = f({"w": v}, x)
    got = jax.jit(dora_jax.apply(f, strict=True))(adapted, x)
    assert got.dtype == jnp.float32
    assert _relative_error(got, expected) < 1e-5


def test_conv_with_a_preferred_element_type_keeps_the_low_rank_branch_in_it():
    """A bfloat16 convolution asked for float32 results computes its low-rank branch in
    float32, not with A rounded to bfloat16."""
    w = (0.2 * jax.random.normal(jax.random.key(0), (3, 3, 4, 6))).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4)).astype(jnp.bfloat16)
    adapted = perturb(
        dora_jax.wrap(
            {"w": w}, rank=3, method="dora", targets="w", axes={"w": dora_jax.Axes((), (0, 1, 2))}
        )
    )
    dn = ("NHWC", "HWIO", "NHWC")

    def f(p, x):
        return lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=dn, preferred_element_type=jnp.float32
        )

    node = adapted["w"]
    v = node.base.astype(jnp.float32) + node.scale * jnp.einsum("hwir,ro->hwio", node.a, node.b)
    v = node.magnitude * v / jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2)))
    expected = lax.conv_general_dilated(x.astype(jnp.float32), v, (1, 1), "SAME",
                                        dimension_numbers=dn)  # fmt: skip
    got = dora_jax.apply(f, strict=True)(adapted, x)
    assert got.dtype == jnp.float32
    assert _relative_error(got, expected) < 1e-5


def test_a_bfloat16_program_keeps_its_low_rank_branch_in_bfloat16():
    """No silent upcast: bf16 activations and kernel compute every product in bfloat16."""
    w = jax.random.normal(jax.random.key(0), (32, 16), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (8, 32), jnp.bfloat16)
    adapted = perturb(dora_jax.wrap({"w": w}, rank=4, method="lora", targets="w"))
    program = jax.make_jaxpr(dora_jax.apply(lambda p, x: x @ p["w"]))(adapted, x)
    dots = [e for e in program.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # x W0, x A, (x A) s B
    assert all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)


class _KeepsItsRngs(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.rngs = rngs  # the same nnx.Rngs is also passed as an argument

    def __call__(self, x, rngs):
        return self.drop(self.lin(x), rngs=rngs)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_state_shared_between_arguments_is_written_back_once(jit):
    """A variable reachable from two NNX arguments (the model's own nnx.Rngs, also passed)
    is one variable: the dropout counter advances every call, as called directly."""
    traces = []

    def fn(rngs, model, x):
        traces.append(1)
        return model(x, rngs)

    graphdef, state = nnx.split(_KeepsItsRngs(nnx.Rngs(0, dropout=1)))
    state = perturb(dora_jax.wrap(state, rank=2, method="dora"))
    adapted, reference = nnx.merge(graphdef, state), nnx.merge(graphdef, ref_params(state))
    f = nnx.jit(dora_jax.apply(fn)) if jit else dora_jax.apply(fn)
    x = jax.random.normal(jax.random.key(2), (4, 8))
    for call in range(1, 4):
        got = f(adapted.rngs, adapted, x)
        np.testing.assert_allclose(got, fn(reference.rngs, reference, x), rtol=1e-5, atol=1e-5)
        assert int(adapted.rngs.dropout.count[...]) == call
    assert len(traces) == 1 + 3  # traced once (eager cache hit), plus the reference calls
