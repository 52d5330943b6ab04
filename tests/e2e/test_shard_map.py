"""Adapted kernels inside ``shard_map`` and on ``Explicit`` meshes, on 8 simulated devices.

The checks run in one subprocess (the device count is fixed when jax starts) and report
per case; each case compares the loss and the trainable leaves' gradients with a plain-jnp
reference of the formula (tests/helpers.py) on unsharded arrays.
"""

import pytest

from tests.helpers import ROOT, device_result

pytestmark = pytest.mark.e2e


_SCRIPT = r"""
import contextlib, dataclasses, json, sys, traceback, warnings
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import dora_jax
from tests import helpers as ref

k = jax.random.split(jax.random.key(0), 6)
W = {{"w": jax.random.normal(k[0], (16, 8)), "w2": jax.random.normal(k[1], (8, 4))}}
X = jax.random.normal(k[2], (8, 16))


def adapted(method):
    a = dora_jax.wrap(W, rank=2, method=method, targets=r"w$")
    node = a["w"]
    a["w"] = dataclasses.replace(node, b=0.3 * jax.random.normal(k[3], node.b.shape))
    return a


def ref_kernel(node):
    if isinstance(node, dora_jax.VeRA | dora_jax.DVoRA):
        v = node.base + ref.vera_delta(node.shared_a, node.shared_b, node.d, node.b, 16, 8)
    else:
        v = node.base + ref.lora_delta(node.a, node.b, node.scale)
    return ref.decompose(v, node.magnitude) if hasattr(node, "magnitude") else v


def loss_of(y):
    return jnp.sum(jnp.sin(y) + y * y)


def reference(a):
    def f(node):
        return loss_of(jnp.tanh(X @ ref_kernel(node)) @ a["w2"])
    return jax.value_and_grad(f)(a["w"])


def check(a, fn, x=X, jit=True):
    rl, rg = reference(jax.tree.map(np.asarray, a))  # unsharded copies
    loss = lambda a, x: loss_of(dora_jax.apply(fn, strict=True)(a, x))
    g_fn = jax.value_and_grad(loss)
    l, g = (jax.jit(g_fn) if jit else g_fn)(a, x)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    for name in type(a["w"]).trainable:
        np.testing.assert_allclose(
            getattr(g["w"], name), getattr(rg, name), rtol=1e-4, atol=1e-5, err_msg=name
        )


out = {{}}


def case(name, thunk):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", dora_jax.FallbackWarning)
            thunk()
        out[name] = "ok"
    except Exception:
        out[name] = traceback.format_exc()[-2500:]


# --- shard_map: the kernel sharded on its input axis (row-parallel, psum) or output axis --
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def row(p, x):
    body = lambda w, x: jax.lax.psum(x @ w, "model")
    h = jax.shard_map(body, mesh=mesh, in_specs=(P("model", None), P("data", "model")),
                      out_specs=P("data", None))(p["w"], x)
    return jnp.tanh(h) @ p["w2"]


def col(p, x):
    h = jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(P(None, "model"), P("data")),
                      out_specs=P("data", "model"))(p["w"], x)
    return jnp.tanh(h) @ p["w2"]


def col_unchecked(p, x):
    h = jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(P(None, "model"), P("data")),
                      out_specs=P("data", "model"), check_vma=False)(p["w"], x)
    return jnp.tanh(h) @ p["w2"]


for method in ("lora", "dora", "vera", "dvora"):
    for fname, fn in (("row", row), ("col", col), ("col_unchecked", col_unchecked)):
        for jit in (False, True):
            case(f"shard_map-{{method}}-{{fname}}-{{jit}}",
                 lambda: check(adapted(method), fn, jit=jit))



def dropout_in_shard_map():
    a = dora_jax.wrap(W, rank=2, method="dora", targets=r"w$", dropout=0.5)
    a["w"] = dataclasses.replace(a["w"], b=0.3 * jax.random.normal(k[3], a["w"].b.shape))
    f = jax.jit(lambda a, key: dora_jax.apply(row, key=key, strict=True)(a, X))
    y1, y2 = f(a, jax.random.key(1)), f(a, jax.random.key(2))
    assert np.all(np.isfinite(y1)) and not np.allclose(y1, y2)
    np.testing.assert_array_equal(f(a, jax.random.key(1)), y1)


case("shard_map-dropout", dropout_in_shard_map)


# --- dora_jax.apply called inside a shard_map body -----------------------------------------
def inside(method, split):
    # Data parallel: the adapted params enter the body replicated (or split on the kernel's
    # input or output axis), the batch split over "data"; loss and gradients against the
    # unsharded reference.
    a = adapted(method)
    specs = {{"replicated": P(), "row": P("model", None), "col": P(None, "model")}}
    spec = dora_jax.sharding.param_specs(a, mesh, rules=((r"^w$", specs[split]),))

    def body(a, x):
        h = dora_jax.apply(lambda p, x: x @ p["w"], strict=True)(a, x)
        if split == "row":
            h = jax.lax.psum(h, "model")
        y = jnp.tanh(h) @ a["w2"]
        return jax.lax.psum(loss_of(y), "data")

    x_spec = P("data", "model") if split == "row" else P("data")
    out_spec = P()
    loss = jax.shard_map(body, mesh=mesh, in_specs=(spec, x_spec), out_specs=out_spec,
                         check_vma=split != "col")
    if split == "col":  # each device's output columns; gather them for the loss
        def loss(a, x):
            def cols(a, x):
                return dora_jax.apply(lambda p, x: x @ p["w"], strict=True)(a, x)
            h = jax.shard_map(cols, mesh=mesh, in_specs=(spec, P("data")),
                              out_specs=P("data", "model"))(a, x)
            return loss_of(jnp.tanh(h) @ a["w2"])
    rl, rg = reference(jax.tree.map(np.asarray, a))
    l, g = jax.jit(jax.value_and_grad(loss))(a, X)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    for name in type(a["w"]).trainable:
        np.testing.assert_allclose(
            getattr(g["w"], name), getattr(rg, name), rtol=1e-4, atol=1e-5, err_msg=name
        )


def inside_split_is_an_error(method, split):
    try:
        inside(method, split)
    except ValueError as e:
        assert "inside a shard_map body" in str(e) and "outside" in str(e), e
    else:
        raise AssertionError("no error")


for method in ("lora", "dora", "vera", "dvora"):
    case(f"inside-{{method}}-replicated", lambda: inside(method, "replicated"))
    for split in ("row", "col"):
        # Each device's shard of x W0 + s (x A) B is all LoRA needs, and on output columns
        # DoRA's norms are per column too; VeRA's shared matrices and a norm over a split
        # input axis need the whole kernel.
        if method == "lora" or (method == "dora" and split == "col"):
            case(f"inside-{{method}}-{{split}}", lambda: inside(method, split))
        else:
            case(f"inside-{{method}}-{{split}}", lambda: inside_split_is_an_error(method, split))


def inside_unchecked(method, split):
    # check_vma=False: jax records no splits, so apply cannot check them. The replicated
    # forward is still right; DoRA, VeRA and DVoRA say that it is right only if replicated.
    a = adapted(method)
    w_spec = P() if split == "replicated" else P("model", None)
    spec = dora_jax.sharding.param_specs(a, mesh, rules=((r"^w$", w_spec),))

    def body(a, x):
        h = dora_jax.apply(lambda p, x: x @ p["w"], strict=True)(a, x)
        if split == "row":
            h = jax.lax.psum(h, "model")
        return jax.lax.psum(loss_of(jnp.tanh(h) @ a["w2"]), "data")

    x_spec = P("data", "model") if split == "row" else P("data")
    loss = jax.shard_map(body, mesh=mesh, in_specs=(spec, x_spec), out_specs=P(), check_vma=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l, g = jax.jit(jax.value_and_grad(loss))(a, X)
    said = [w for w in caught if "check_vma=False" in str(w.message)]
    assert len(said) == (method != "lora"), [str(w.message) for w in caught]
    assert not said or "'w'" in str(said[0].message), said[0].message
    if split == "replicated":
        rl, rg = reference(jax.tree.map(np.asarray, a))
        np.testing.assert_allclose(l, rl, rtol=1e-5)
        for name in type(a["w"]).trainable:
            np.testing.assert_allclose(
                getattr(g["w"], name), getattr(rg, name), rtol=1e-4, atol=1e-5, err_msg=name
            )


for method in ("lora", "dora", "vera", "dvora"):
    for split in ("replicated", "row"):
        case(f"inside-unchecked-{{method}}-{{split}}", lambda: inside_unchecked(method, split))


# --- a torch-layout (out, in) kernel used as x @ w.T inside shard_map ---------------------
WT = {{"w": W["w"].T, "w2": W["w2"]}}  # (8, 16): output axis first


def torch_row(p, x):  # input axis sharded: partial products summed
    body = lambda w, x: jax.lax.psum(x @ w.T, "model")
    h = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "model"), P("data", "model")),
                      out_specs=P("data", None))(p["w"], x)
    return jnp.tanh(h) @ p["w2"]


def torch_col(p, x):  # output axis sharded
    h = jax.shard_map(lambda w, x: x @ w.T, mesh=mesh, in_specs=(P("model", None), P("data")),
                      out_specs=P("data", "model"))(p["w"], x)
    return jnp.tanh(h) @ p["w2"]


def torch_layout(fn):
    axes = dora_jax.infer_axes(fn, WT, X)  # follows the kernel into the shard_map body
    assert axes["w"] == dora_jax.Axes((), (1,)), axes
    a = dora_jax.wrap(WT, rank=2, method="dora", targets=r"w$", axes=axes)
    a["w"] = dataclasses.replace(a["w"], b=0.3 * jax.random.normal(k[3], a["w"].b.shape))
    node = jax.tree.map(np.asarray, a)["w"]

    def ref_loss(n):  # (in, out) reference kernel from the canonical leaves
        v = n.base.T + ref.lora_delta(n.a, n.b, n.scale)
        return loss_of(jnp.tanh(X @ ref.decompose(v, n.magnitude)) @ WT["w2"])

    rl, rg = jax.value_and_grad(ref_loss)(node)
    loss = lambda a: loss_of(dora_jax.apply(fn, strict=True)(a, X))
    l, g = jax.jit(jax.value_and_grad(loss))(a)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    for name in ("a", "b", "magnitude"):
        np.testing.assert_allclose(getattr(g["w"], name), getattr(rg, name), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


case("shard_map-torch-row", lambda: torch_layout(torch_row))
case("shard_map-torch-col", lambda: torch_layout(torch_col))

# --- Explicit axis types (jax.make_mesh's default) --------------------------------------
emesh = jax.make_mesh((2, 4), ("data", "fsdp"))
assert emesh.axis_types == (AxisType.Explicit,) * 2


def mlp(p, x):
    return jnp.tanh(x @ p["w"]) @ p["w2"]


def on_explicit(method, spec, with_mesh, jit):
    cm = jax.set_mesh(emesh) if with_mesh else contextlib.nullcontext()
    with cm:
        put = lambda v, s=P(): jax.device_put(v, NamedSharding(emesh, s))
        a = dora_jax.wrap({{"w": put(W["w"], spec), "w2": put(W["w2"])}}, rank=2,
                          method=method, targets=r"w$")
        node = a["w"]
        a["w"] = dataclasses.replace(node, b=0.3 * jax.random.normal(k[3], node.b.shape))
        # dora_jax.sharding places every leaf on the mesh, adapters like their kernel.
        shardings = dora_jax.sharding.shardings(a, emesh, rules=((r"^w$", spec),))
        a = dora_jax.sharding.put(a, shardings)
        m_spec = NamedSharding(emesh, P(*spec[1:]))
        assert a["w"].magnitude.sharding.is_equivalent_to(m_spec, 1), a["w"].magnitude.sharding
        check(a, mlp, x=put(X, P("data", None)), jit=jit)
        merged = dora_jax.merge(a)["w"]
    plain = jax.tree.map(np.asarray, a)
    np.testing.assert_allclose(merged, ref_kernel(plain["w"]), rtol=1e-5, atol=1e-6)


for method in ("dora", "dvora"):
    for sname, spec in (("in", P("fsdp", None)), ("out", P(None, "fsdp"))):
        for with_mesh, jit in ((True, False), (True, True), (False, True)):
                # (No mesh context, eager grad: plain JAX itself asks for jax.set_mesh.)
                case(f"explicit-{{method}}-{{sname}}-{{with_mesh}}-{{jit}}",
                     lambda: on_explicit(method, spec, with_mesh, jit))



def explicit_scan():
    # A scanned stack (layers, in, out) sharded on its input axis, stack axis unsharded.
    ws = jax.random.normal(k[4], (3, 16, 16)) / 4
    fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    loss_of = lambda y: jnp.sum(y * y)
    with jax.set_mesh(emesh):
        a = dora_jax.wrap({{"w": ws}}, rank=2, targets=r"w$", axes={{"w": dora_jax.Axes(1, 1)}})
        a["w"] = dataclasses.replace(a["w"], b=0.3 * jax.random.normal(k[5], a["w"].b.shape))
        rules = ((r"^w$", P("fsdp", None)),)
        a = dora_jax.sharding.put(a, dora_jax.sharding.shardings(a, emesh, rules=rules))
        xs = jax.device_put(X, NamedSharding(emesh, P("data", None)))
        loss = lambda a: loss_of(dora_jax.apply(fn, strict=True)(a, xs))
        l, g = jax.jit(jax.value_and_grad(loss))(a)
    node = jax.tree.map(np.asarray, a)["w"]
    rl, rg = jax.value_and_grad(lambda n: loss_of(fn({{"w": ref_kernel(n)}}, X)))(node)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    for name in ("a", "b", "magnitude"):
        np.testing.assert_allclose(getattr(g["w"], name), getattr(rg, name), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


case("explicit-scan", explicit_scan)


def explicit_out_sharding(method):
    # flax's Gemma on an Explicit mesh: a heads-first kernel (N, D, H) sharded on its heads
    # and input axes, x's features sharded over another axis than the kernel's input axis,
    # the einsum naming its output's sharding (plain jax refuses it unnamed).
    with jax.set_mesh(emesh):
        w = jax.device_put(jax.random.normal(k[4], (4, 16, 8)) / 4,
                           NamedSharding(emesh, P("fsdp", "data", None)))
        x = jax.device_put(jax.random.normal(k[5], (2, 3, 16)),
                           NamedSharding(emesh, P("data", None, "fsdp")))
        fn = lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["w"],
                                     out_sharding=P("data", None, "fsdp", None))
        a = dora_jax.wrap({{"w": w}}, rank=2, method=method, targets=r"^w$",
                          axes={{"w": dora_jax.Axes((), (1,))}})
        a["w"] = dataclasses.replace(a["w"], b=0.3 * jax.random.normal(k[3], a["w"].b.shape))
        loss = lambda a: jnp.sum(jnp.sin(dora_jax.apply(fn, strict=True)(a, x)))
        l, g = jax.jit(jax.value_and_grad(loss))(a)
    node = jax.tree.map(np.asarray, a)["w"]
    xs = np.asarray(x)

    def ref_loss(n):  # the kernel as (D, N*H), the formula on it, back to (N, D, H)
        v = n.base.transpose(1, 0, 2).reshape(16, 32)
        if isinstance(n, dora_jax.VeRA | dora_jax.DVoRA):
            v = v + ref.vera_delta(n.shared_a, n.shared_b, n.d, n.b.reshape(32), 16, 32)
        else:
            v = v + ref.lora_delta(n.a.reshape(16, -1), n.b.reshape(-1, 32), n.scale)
        if hasattr(n, "magnitude"):
            v = ref.decompose(v, n.magnitude.reshape(32))
        kernel = v.reshape(16, 4, 8).transpose(1, 0, 2)
        return jnp.sum(jnp.sin(jnp.einsum("BTD,NDH->BTNH", xs, kernel)))

    rl, rg = jax.value_and_grad(ref_loss)(node)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    for name in type(node).trainable:
        np.testing.assert_allclose(getattr(g["w"], name), getattr(rg, name), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


for method in ("lora", "dora", "vera", "dvora"):
    case(f"explicit-out-sharding-{{method}}", lambda: explicit_out_sharding(method))

print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return device_result(_SCRIPT.format(root=str(ROOT)), 8)


def _cases(prefix):
    methods = ("lora", "dora", "vera", "dvora") if prefix == "shard_map" else ("dora", "dvora")
    if prefix == "shard_map":
        return [
            f"shard_map-{m}-{f}-{j}"
            for m in methods
            for f in ("row", "col", "col_unchecked")
            for j in (False, True)
        ]
    return [
        f"explicit-{m}-{s}-{w}-{j}"
        for m in methods
        for s in ("in", "out")
        for w, j in ((True, False), (True, True), (False, True))
    ]


@pytest.mark.parametrize(
    "name",
    [*_cases("shard_map"), "shard_map-dropout", "shard_map-torch-row", "shard_map-torch-col"],
)
def test_shard_map_factored_equals_unsharded_reference(results, name):
    # strict=True inside: a kernel formed as W' (the old behaviour) would raise.
    assert results[name] == "ok", results[name]


@pytest.mark.parametrize(
    "name",
    [
        f"inside-{m}-{s}"
        for m in ("lora", "dora", "vera", "dvora")
        for s in ("replicated", "row", "col")
    ]
    + [
        f"inside-unchecked-{m}-{s}"
        for m in ("lora", "dora", "vera", "dvora")
        for s in ("replicated", "row")
    ],
)
def test_apply_inside_a_shard_map_body(results, name):
    # Replicated params: the factored forward on each device's batch. Split LoRA kernels and
    # DoRA split on its output columns: each device's shard. DoRA split on its input axis,
    # VeRA and DVoRA split: a clear error (the norm over the whole input axis, the shared
    # matrices cut to the kernel's shape), never a wrong shard.
    assert results[name] == "ok", results[name]


@pytest.mark.parametrize(
    "name",
    [
        *_cases("explicit"),
        "explicit-scan",
        *(f"explicit-out-sharding-{m}" for m in ("lora", "dora", "vera", "dvora")),
    ],
)
def test_explicit_mesh_equals_unsharded_reference(results, name):
    assert results[name] == "ok", results[name]
