"""NNX kernels with sharding metadata, wrapped: each adapter field gets its own spec.

A Flax ``Variable`` holds one spec; on the ``Param`` that holds an adapter node it would be
applied to fields of other ranks and axes. ``wrap`` moves the kernel's ``out_sharding`` off
that ``Param`` (``nnx.get_partition_spec`` then gives ``P()``, never the kernel's spec),
``dora_jax.sharding.get_partition_spec`` derives each field's spec from it, and ``merge``
puts it back. The expected specs are written out by hand below; on 8 simulated devices
Flax's placement recipe with them places every field so, and a training step keeps it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import sharding
from tests.helpers import ROOT, device_result

METHODS = ("lora", "dora", "vera", "dvora")
INIT = nnx.initializers.lecun_normal()


def _spec(spec) -> tuple:
    """A spec as a tuple without trailing Nones (``P('a', None)`` places as ``P('a')``)."""
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(INIT, ("embed", "mlp")),
                             rngs=rngs)  # fmt: skip
        self.down = nnx.Linear(32, 16, kernel_metadata={"out_sharding": ("mlp", "embed")},
                               rngs=rngs)  # fmt: skip

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


class Stack(nnx.Module):
    """Three (16, 16) layers made with nnx.vmap: kernel (layers, embed, mlp)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            init = nnx.with_partitioning(INIT, ("embed", "mlp"))
            return nnx.Linear(16, 16, kernel_init=init, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})  # fmt: skip
        def body(layer, x):
            return jnp.tanh(layer(x))

        return body(self.layers, x)


def _one_device_mesh():
    names = ("layers", "embed", "mlp")
    return jax.make_mesh((1, 1, 1), names, axis_types=(AxisType.Auto,) * 3)


def _make(cls):
    with jax.set_mesh(_one_device_mesh()):  # eager sharding needs a mesh
        return cls(nnx.Rngs(0))


def _adapted(model, method, whole: bool):
    """``wrap(model)``, or ``nnx.merge(graphdef, wrap(state))``."""
    if whole:
        return dora_jax.wrap(model, rank=4, method=method)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, dora_jax.wrap(state, rank=4, method=method))


def _expected(method, kernel, inputs, outputs, stack=()):
    """Each field's spec, by hand: base like the kernel, A (stack, in, rank), B (stack, rank,
    out), m and VeRA's b (stack, out), VeRA's d (stack, rank), shared matrices replicated."""
    fields = {"base": kernel}
    if method in ("lora", "dora"):
        fields |= {"a": (*stack, *inputs, None), "b": (*stack, None, *outputs)}
    else:
        fields |= {"shared_a": (), "shared_b": (), "d": (*stack, None), "b": (*stack, *outputs)}
    if method in ("dora", "dvora"):
        fields["magnitude"] = (*stack, *outputs)
    return {k: _spec(v) for k, v in fields.items()}


def _fields(node, kind) -> dict:
    """The node's fields that are ``kind`` (its data fields, not its static settings)."""
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return {k: v for k, v in fields.items() if isinstance(v, kind)}


def _field_specs(param) -> dict:
    return {k: _spec(v) for k, v in _fields(param.get_value(), P).items()}


@pytest.mark.parametrize("whole", [True, False], ids=["wrap_model", "merge_wrap_state"])
@pytest.mark.parametrize("method", METHODS)
def test_specs_follow_the_kernel(method, whole):
    adapted = _adapted(_make(TwoLayers), method, whole)
    state = nnx.state(adapted)
    specs = sharding.get_partition_spec(state)
    assert _field_specs(specs["up"]["kernel"]) == _expected(
        method, ("embed", "mlp"), ("embed",), ("mlp",)
    )
    assert _field_specs(specs["down"]["kernel"]) == _expected(
        method, ("mlp", "embed"), ("mlp",), ("embed",)
    )
    assert specs["up"]["bias"].get_value() == P()
    # Flax's own function no longer gives the node the kernel's one spec: P(), replicated.
    flax_specs = nnx.get_partition_spec(state)
    assert flax_specs["up"]["kernel"].get_value() == P()
    assert flax_specs["down"]["kernel"].get_value() == P()
    # Every leaf has a spec of its own rank.
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(specs), strict=True):
        assert len(s) <= x.ndim


@pytest.mark.parametrize("method", METHODS)
def test_stacked_layers_specs_and_forward(method):
    model = _make(Stack)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    adapted = _adapted(model, method, whole=True)
    specs = sharding.get_partition_spec(nnx.state(adapted))
    assert _field_specs(specs["layers"]["kernel"]) == _expected(
        method, ("layers", "embed", "mlp"), ("embed",), ("mlp",), stack=("layers",)
    )
    with jax.set_mesh(_one_device_mesh()):
        y = dora_jax.apply(lambda m, x: m(x))(adapted, x)
    assert jnp.allclose(y, model(x), atol=1e-5)  # identity at init, through nnx.scan


@pytest.mark.parametrize("whole", [True, False], ids=["wrap_model", "merge_wrap_state"])
def test_merge_restores_the_kernel_metadata(whole):
    model = _make(TwoLayers)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, dora_jax.merge(nnx.state(_adapted(model, "dora", whole))))
    for name in ("up", "down"):
        kernel = getattr(merged, name).kernel
        assert kernel.get_metadata() == getattr(model, name).kernel.get_metadata()
    merged_state = nnx.state(merged)
    assert jax.tree.structure(merged_state) == jax.tree.structure(state)
    assert nnx.get_partition_spec(merged_state)["up"]["kernel"].get_value() == P("embed", "mlp")
    # Merging the module itself keeps it too.
    merged_model = dora_jax.merge(_adapted(model, "dora", whole))
    assert merged_model.down.kernel.get_metadata() == model.down.kernel.get_metadata()


def test_logical_axis_rules_apply_as_in_flax():
    rules = (("in_features", "embed"), ("out_features", "mlp"))
    with jax.set_mesh(_one_device_mesh()):
        model = nnx.Linear(16, 32, rngs=nnx.Rngs(0), kernel_metadata={
            "out_sharding": ("in_features", "out_features"), "sharding_rules": rules})  # fmt: skip
    specs = sharding.get_partition_spec(nnx.state(dora_jax.wrap(model, rank=4)))
    assert _field_specs(specs["kernel"]) == _expected("dora", ("embed", "mlp"), ("embed",),
                                                      ("mlp",))  # fmt: skip


_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import dora_jax
from dora_jax import sharding
from tests import test_nnx_sharding as t

jax.config.update("jax_default_matmul_precision", "highest")
mesh = jax.make_mesh((2, 4), ("embed", "mlp"), axis_types=(AxisType.Auto,) * 2)
with jax.set_mesh(mesh):
    model = t.TwoLayers(nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (8, 16))
forward = dora_jax.apply(lambda m, x: m(x))
out = {{}}


def placed(adapted):
    return {{name: {{k: list(t._spec(v.sharding.spec)) for k, v in
                   t._fields(getattr(adapted, name).kernel.get_value(), jax.Array).items()}}
            for name in ("up", "down")}}


@nnx.jit
def place(m):  # Flax's recipe, with dora_jax's specs
    state = nnx.state(m)
    nnx.update(m, jax.lax.with_sharding_constraint(state, sharding.get_partition_spec(state)))


@nnx.jit
def place_flax(m):  # Flax's recipe as it is
    state = nnx.state(m)
    nnx.update(m, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))


def loss_fn(m):
    return jnp.mean((forward(m, x) - 1.0) ** 2)


@nnx.jit
def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss, grads


@nnx.jit
def adapted_and_merged(m):
    graphdef, state = nnx.split(m)
    return forward(m, x), nnx.merge(graphdef, dora_jax.merge(state))(x)


for method in ("lora", "dora", "vera"):
    adapted = dora_jax.wrap(model, rank=4, method=method)
    with jax.set_mesh(mesh):
        place(adapted)
    out[method] = {{"placed": placed(adapted)}}

    if method == "dora":
        plain = nnx.clone(adapted)  # unplaced reference, one device
        plain_state = jax.tree.map(np.asarray, nnx.state(adapted))
        nnx.update(plain, jax.tree.map(jnp.asarray, plain_state))
        tx = dora_jax.only_trainable(optax.adamw(1e-2))
        with jax.set_mesh(mesh):
            opt = nnx.Optimizer(adapted, tx, wrt=nnx.Param)
            losses = [float(step(adapted, opt)[0]) for _ in range(3)]
            _, grads = step(adapted, opt)
        ref_opt = nnx.Optimizer(plain, tx, wrt=nnx.Param)
        for _ in range(4):
            _, ref_grads = step(plain, ref_opt)
        out[method]["losses"] = losses
        out[method]["after_step"] = placed(adapted)
        out[method]["grad_err"] = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True))
        opt_state = nnx.state(opt, nnx.OptState)["opt_state"]
        mu = opt_state["inner_states"]["train"]["inner_state"][0]["mu"]
        out[method]["mu_a"] = list(t._spec(mu["up"]["kernel"]["a"].get_value().sharding.spec))
        with jax.set_mesh(mesh):
            y, y_merged = adapted_and_merged(adapted)
        out[method]["merged_err"] = float(jnp.max(jnp.abs(y_merged - y)))

flax_way = dora_jax.wrap(model, rank=4, method="dora")
with jax.set_mesh(mesh):
    place_flax(flax_way)  # runs (before: the kernel's 2-D spec on the 1-D magnitude failed)
out["flax_recipe"] = placed(flax_way)
print("RESULT" + json.dumps(out))
"""


def test_flax_recipe_places_and_training_keeps_it_on_8_devices():
    got = device_result(_SCRIPT.format(root=str(ROOT)), 8)
    for method in ("lora", "dora", "vera"):
        want = {
            "up": _expected(method, ("embed", "mlp"), ("embed",), ("mlp",)),
            "down": _expected(method, ("mlp", "embed"), ("mlp",), ("embed",)),
        }
        placed = {n: {k: tuple(v) for k, v in f.items()} for n, f in got[method]["placed"].items()}
        assert placed == want
    dora = got["dora"]
    after = {n: {k: tuple(v) for k, v in f.items()} for n, f in dora["after_step"].items()}
    assert after == {n: {k: tuple(v) for k, v in f.items()} for n, f in dora["placed"].items()}
    assert dora["losses"][-1] < dora["losses"][0]
    assert dora["grad_err"] < 1e-5
    assert tuple(dora["mu_a"]) == ("embed",)
    assert dora["merged_err"] < 1e-5
    # nnx.get_partition_spec's P() for a node: everything replicated, nothing misplaced.
    assert all(v == [] for f in got["flax_recipe"].values() for v in f.values())
