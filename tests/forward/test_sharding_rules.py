"""Adapted kernels that the program reshards, constrains or types by their sharding.

On 8 simulated devices (one subprocess, reporting per case):

- on an ``Explicit`` mesh the traced program sees each adapted kernel with its base's
  sharding, so a ``shard_map`` whose ``in_specs`` name that sharding runs (factored);
- ``lax.with_sharding_constraint`` (what Flax's ``nn.with_partitioning`` applies to boxed
  params under a mesh) and ``jax.sharding.reshard`` (Explicit-mesh FSDP before a dot) keep
  the kernel factored: the base and every factor are constrained alike, no ``W'`` is
  formed (``strict=True`` passes, and the step's temporary memory carries no ``W'`` copy).

Losses and gradients are compared with a plain-jnp reference that forms ``W'`` by hand
(tests/helpers.py) on unsharded copies.
"""

import pytest

from tests.helpers import ROOT, device_result

METHODS = ("lora", "dora", "vera", "dvora")

_SCRIPT = r"""
import dataclasses, json, sys, traceback, warnings
sys.path.insert(0, {root!r})
import flax.linen as nn
import jax, jax.extend, jax.numpy as jnp, numpy as np
from flax.core import meta
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import dora_jax
from dora_jax import sharding as dsh
from tests import helpers as ref

jax.config.update("jax_default_matmul_precision", "highest")
k = jax.random.split(jax.random.key(0), 6)
W = {{"w": jax.random.normal(k[0], (16, 8)) / 4, "w2": jax.random.normal(k[1], (8, 4)) / 4}}
X = jax.random.normal(k[2], (8, 16))
out = {{}}
METHODS = ("lora", "dora", "vera", "dvora")


def case(name, thunk):
    try:
        thunk()
        out[name] = "ok"
    except Exception:
        out[name] = traceback.format_exc()[-2500:]


def unsharded(tree):
    return jax.tree.map(np.asarray, tree)


def loss_of(y):
    return jnp.sum(jnp.sin(y) + y * y)


def assert_grads_match(g, rg):
    # g, rg: adapted trees of gradients (rg from the reference); every trainable field.
    for path, node in ref.adapter_nodes(rg).items():
        mine = ref.adapter_nodes(g)[path]
        for name in type(node).trainable:
            want = np.asarray(getattr(node, name))
            np.testing.assert_allclose(getattr(mine, name), want, rtol=1e-4,
                                       atol=1e-5 * max(1.0, np.abs(want).max()),
                                       err_msg=f"{{path}} {{name}}")


def reference(adapted, fn, *args):
    # Loss and gradients of fn with every W' formed by the plain-jnp formula.
    frozen, trainable = dora_jax.partition(unsharded(adapted))
    args = unsharded(args)
    loss = lambda t: loss_of(fn(ref.ref_params(dora_jax.combine(frozen, t)), *args))
    return jax.value_and_grad(loss)(trainable)


def adapted_grads(adapted, fn, *args):
    frozen, trainable = dora_jax.partition(adapted)
    loss = lambda t, f, *a: loss_of(dora_jax.apply(fn, strict=True)(dora_jax.combine(f, t), *a))
    return jax.jit(jax.value_and_grad(loss))(trainable, frozen, *args)


# --- A: shard_map over an adapted kernel on an Explicit mesh --------------------------------
emesh = jax.make_mesh((2, 4), ("data", "model"))
assert emesh.axis_types == (AxisType.Explicit,) * 2
SPLITS = {{"in": P("model", None), "out": P(None, "model")}}


def explicit_shard_map(method, split, factors="like-kernel"):
    spec = SPLITS[split]
    seen = []

    def fn(p, x):
        seen.append(jax.typeof(p["w"]).sharding.spec)
        if split == "in":  # row-parallel: partial products summed over the input shards
            body = lambda w, x: jax.lax.psum(x @ w, "model")
            x_spec, h_spec = P("data", "model"), P("data", None)
        else:  # column-parallel: each device's output columns
            body = lambda w, x: x @ w
            x_spec, h_spec = P("data", None), P("data", "model")
        x = jax.sharding.reshard(x, x_spec)
        h = jax.shard_map(body, mesh=emesh, in_specs=(spec, x_spec), out_specs=h_spec)(p["w"], x)
        return jnp.tanh(h) @ p["w2"]

    a = ref.perturb(dora_jax.wrap(W, rank=2, method=method, targets=r"^w$", key=k[3]))
    rules = ((r"^w$", spec),)
    sh = dsh.shardings(a, emesh, rules)
    if factors == "replicated":  # only the base split like the kernel
        rep = NamedSharding(emesh, P())
        sh = jax.tree.map(lambda _: rep, sh)
        sh["w"] = dataclasses.replace(sh["w"], base=NamedSharding(emesh, spec))
    a = dsh.put(a, sh)
    x = jax.device_put(X, NamedSharding(emesh, P("data", None)))
    rl, rg = reference(a, lambda p, x: jnp.tanh(x @ p["w"]) @ p["w2"], X)
    with jax.set_mesh(emesh):
        l, g = adapted_grads(a, fn, x)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    assert_grads_match(g, rg)
    assert seen and all(s == spec for s in seen), seen  # the model sees the kernel split


for method in METHODS:
    for split in SPLITS:
        case(f"A-{{method}}-{{split}}", lambda: explicit_shard_map(method, split))
for split in SPLITS:
    case(f"A-dora-{{split}}-replicated-factors",
         lambda: explicit_shard_map("dora", split, "replicated"))


def explicit_infer_axes():
    # infer_axes walks the same program: the shard_map's in_specs must type-check there too.
    fn = lambda p, x: jax.shard_map(lambda w, x: x @ w.T, mesh=emesh,
                                    in_specs=(P("model", None), P("data")),
                                    out_specs=P("data", "model"))(p["w"], x)
    w = jax.device_put(W["w"].T, NamedSharding(emesh, P("model", None)))  # (out, in)
    x = jax.device_put(X, NamedSharding(emesh, P("data")))
    with jax.set_mesh(emesh):
        axes = dora_jax.infer_axes(fn, {{"w": w}}, x)
    assert axes == {{"w": dora_jax.Axes((), (1,))}}, axes


case("A-infer-axes", explicit_infer_axes)


def explicit_shard_map_qdora():
    # A quantised base enters the shard_map as W' (FallbackWarning, not strict), typed with
    # the sharding its dequantised kernel takes from its codes.
    spec = SPLITS["out"]
    fn = lambda p, x: jax.shard_map(lambda w, x: x @ w, mesh=emesh, in_specs=(spec, P("data")),
                                    out_specs=P("data", "model"))(p["w"], x)
    a = dora_jax.wrap(W, rank=2, targets=r"^w$", key=k[3])
    a = dora_jax.quantize_base(ref.perturb(a), "int8", block=4)
    a = dsh.put(a, dsh.shardings(a, emesh, ((r"^w$", spec),)))
    node = unsharded(a)["w"]
    node = dataclasses.replace(node, base=node.base.dequantize())
    x = jax.device_put(X, NamedSharding(emesh, P("data", None)))
    with warnings.catch_warnings(record=True) as caught, jax.set_mesh(emesh):
        warnings.simplefilter("always")
        y = jax.jit(dora_jax.apply(fn))(a, x)
    assert any(issubclass(w.category, dora_jax.FallbackWarning) for w in caught), caught
    np.testing.assert_allclose(y, X @ ref.ref_kernel(node), rtol=1e-5, atol=1e-5)


case("A-qdora-out", explicit_shard_map_qdora)


# --- B: sharding_constraint (Linen nn.with_partitioning) and reshard ------------------------
D, F = 256, 1024


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = lambda names: nn.with_partitioning(nn.initializers.lecun_normal(), names)
        h = nn.Dense(F, use_bias=False, kernel_init=init(("fsdp", "tensor")), name="up_proj")(x)
        return nn.Dense(D, use_bias=False, kernel_init=init(("tensor", "fsdp")),
                        name="down_proj")(nn.gelu(h))


model = MLP()
XB = jax.random.normal(k[4], (16, D))
boxed = model.init(jax.random.key(0), XB)["params"]
mesh = dsh.make_mesh(data=2, fsdp=2, tensor=2)
forward = lambda p, x: model.apply({{"params": p}}, x)


def constraint_specs(fn, *args):
    # {{(shape, spec)}} of the operands the adapted program constrains or reshards.
    found = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("sharding_constraint", "reshard"):
                s = e.params.get("sharding", e.params.get("dst_sharding"))
                found.add((e.invars[0].aval.shape, tuple(s.spec)))
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(dora_jax.apply(fn, strict=True))(*args).jaxpr)
    return found


def boxed_linen(method):
    a = ref.perturb(dora_jax.wrap(boxed, rank=4, method=method, key=k[3]))
    a = dsh.put(a, dsh.shardings(a, mesh))
    x = dsh.put(XB, dsh.batch_sharding(mesh))
    rl, rg = reference(a, forward, XB)
    with jax.set_mesh(mesh):
        l, g = adapted_grads(a, forward, x)
        found = constraint_specs(forward, a, x)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    assert_grads_match(g, rg)
    # Each factor constrained like the kernel axes it spans; the rank axis unsplit.
    node = a["up_proj"]["kernel"].value
    want = {{(node.base.shape, ("fsdp", "tensor"))}}
    if method in ("lora", "dora"):
        want |= {{(node.a.shape, ("fsdp", None)), (node.b.shape, (None, "tensor"))}}
    else:
        want |= {{(node.b.shape, ("tensor",))}}
    if method in ("dora", "dvora"):
        want |= {{(node.magnitude.shape, ("tensor",))}}
    assert want <= found, (want, found)


for method in METHODS:
    case(f"B-linen-{{method}}", lambda: boxed_linen(method))


def boxed_linen_memory():
    # Per-device temporary memory of a DoRA training step: boxed params (constrained) like
    # unboxed ones (540,280 against 536,184 bytes), not the W' the fallback formed every
    # step (1,838,456 bytes).
    temps = {{}}
    for name, params in (("boxed", boxed), ("unboxed", meta.unbox(boxed))):
        a = dora_jax.wrap(params, rank=8)
        a = dsh.put(a, dsh.shardings(a, mesh))
        frozen, trainable = dora_jax.partition(a)
        x = dsh.put(XB, dsh.batch_sharding(mesh))
        fwd = dora_jax.apply(forward)  # not strict: a W' formed shows in the temp
        loss = lambda t, f, x: jnp.mean(fwd(dora_jax.combine(f, t), x) ** 2)
        with jax.set_mesh(mesh), warnings.catch_warnings():
            warnings.simplefilter("ignore", dora_jax.FallbackWarning)
            step = jax.jit(jax.grad(loss)).lower(trainable, frozen, x).compile()
        temps[name] = step.memory_analysis().temp_size_in_bytes
    kernel_shard = D * F * 4 // 4  # f32, split over fsdp x tensor
    assert temps["boxed"] - temps["unboxed"] < kernel_shard // 4, (temps, kernel_shard)


case("B-linen-memory", boxed_linen_memory)

fmesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))


def explicit_reshard(method):
    # Explicit-mesh FSDP: the kernel stored over (fsdp, tensor), gathered over fsdp before
    # the dot.
    def fn(p, x):
        w = jax.sharding.reshard(p["w"], P(None, "tensor"))
        return jnp.dot(x, w, out_sharding=P(("data", "fsdp"), "tensor"))

    params = {{"w": jax.random.normal(k[5], (D, 32)) / 16}}
    a = ref.perturb(dora_jax.wrap(params, rank=4, method=method, targets=r"^w$", key=k[3]))
    a = dsh.put(a, dsh.shardings(a, fmesh, ((r"^w$", P("fsdp", "tensor")),)))
    x = jax.device_put(XB, NamedSharding(fmesh, P(("data", "fsdp"))))
    rl, rg = reference(a, lambda p, x: x @ p["w"], XB)
    with jax.set_mesh(fmesh):
        l, g = adapted_grads(a, fn, x)
        found = constraint_specs(fn, a, x)
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    assert_grads_match(g, rg)
    node = a["w"]
    want = {{(node.base.shape, (None, "tensor")), (node.b.shape, (None, "tensor") if
             method in ("lora", "dora") else ("tensor",))}}
    assert want <= found, (want, found)


for method in METHODS:
    case(f"B-reshard-{{method}}", lambda: explicit_reshard(method))


def explicit_lookup(method):
    # An embedding lookup naming its output's sharding on an Explicit mesh: jax reshards
    # the table onto the mesh's Auto axes and gathers there.
    def fn(p, ids):
        return jnp.tanh(p["embedding"].at[ids].get(out_sharding=P("data", None, None)))

    params = {{"embedding": jax.random.normal(k[5], (64, 16))}}
    ids = jax.random.randint(k[4], (8, 5), 0, 64)
    a = dora_jax.wrap(params, rank=4, method=method, targets="embedding$",
                      axes={{"embedding": dora_jax.Axes(0, 1)}}, key=k[3])
    a = ref.perturb(a)
    a = dsh.put(a, dsh.shardings(a, emesh, ((r"embedding$", P("model", None)),)))
    rl, rg = reference(a, lambda p, ids: jnp.tanh(p["embedding"][ids]), ids)
    with jax.set_mesh(emesh):
        l, g = adapted_grads(a, fn, jax.device_put(ids, NamedSharding(emesh, P("data"))))
    np.testing.assert_allclose(l, rl, rtol=1e-5)
    assert_grads_match(g, rg)


for method in METHODS:
    case(f"B-lookup-{{method}}", lambda: explicit_lookup(method))

print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return device_result(_SCRIPT.format(root=str(ROOT)), 8)


@pytest.mark.parametrize(
    "name",
    [f"A-{m}-{s}" for m in METHODS for s in ("in", "out")]
    + [f"A-dora-{s}-replicated-factors" for s in ("in", "out")],
)
def test_shard_map_on_explicit_mesh_sees_the_kernel_split(results, name):
    # The stand-in kernel carries the base's sharding (it was traced as replicated: the
    # shard_map's in_specs were refused); factored, loss and gradients equal the reference.
    assert results[name] == "ok", results[name]


def test_infer_axes_follows_a_shard_map_on_explicit_mesh(results):
    assert results["A-infer-axes"] == "ok", results["A-infer-axes"]


def test_quantised_kernel_in_a_shard_map_on_explicit_mesh(results):
    # QDoRA enters a shard_map as W' (documented), typed as its dequantised kernel.
    assert results["A-qdora-out"] == "ok", results["A-qdora-out"]


@pytest.mark.parametrize("method", METHODS)
def test_with_partitioning_keeps_the_kernel_factored(results, method):
    # Linen boxed params under a mesh: sharding_constraint on base and factors, no W'.
    assert results[f"B-linen-{method}"] == "ok", results[f"B-linen-{method}"]


def test_with_partitioning_step_keeps_no_adapted_kernel(results):
    assert results["B-linen-memory"] == "ok", results["B-linen-memory"]


@pytest.mark.parametrize("method", METHODS)
def test_reshard_keeps_the_kernel_factored(results, method):
    # Explicit-mesh FSDP: reshard before the dot applies to base and factors, no W'.
    assert results[f"B-reshard-{method}"] == "ok", results[f"B-reshard-{method}"]


@pytest.mark.parametrize("method", METHODS)
def test_lookup_with_out_sharding_keeps_the_table_factored(results, method):
    # Explicit mesh: the table resharded onto Auto axes, then gathered there; no W'.
    assert results[f"B-lookup-{method}"] == "ok", results[f"B-lookup-{method}"]
