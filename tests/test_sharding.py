"""Sharding: adapter specs derived from their base, and one training step on one device.

The runs on several (simulated) devices are in tests/e2e/test_sharding.py.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import sharding
from dora_jax.models.llama import LlamaConfig, stack_layer_params
from tests.helpers import tiny_llama, train_sharded

MESH_222 = AbstractMesh((2, 2, 2), sharding.AXES)


# The spec tests only read the params: one initialisation serves them all.
_llama_params = functools.cache(tiny_llama)


def _node(specs, path):
    node = specs
    for part in path.split("/"):
        node = node[part]
    return node


# --- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_specs_follow_their_kernel(method):
    _, params = _llama_params()
    adapted = dora_jax.wrap(params, rank=4, method=method, targets=r"proj/kernel$")
    specs = sharding.param_specs(adapted, MESH_222)
    q = _node(specs, "layers_0/self_attn/q_proj/kernel")
    assert (q.base, q.a, q.b) == (P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor"))
    down = _node(specs, "layers_1/mlp/down_proj/kernel")
    assert (down.base, down.a, down.b) == (P("tensor", "fsdp"), P("tensor", None), P(None, "fsdp"))
    if method == "dora":
        assert q.magnitude == P("tensor") and down.magnitude == P("fsdp")
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["norm"]["scale"] == P(None)


def test_stacked_kernels_keep_stack_axes_unsharded():
    # The issue users hit: a scanned base's spec applied to its adapters must gain the stack
    # axis, not be copied verbatim (a 3-D spec on 2-D factors) or shifted.
    cfg, params = _llama_params()
    stacked = stack_layer_params(params, cfg.num_layers)
    adapted = dora_jax.wrap(
        stacked, rank=4, targets=r"(q_proj|o_proj)/kernel$", axes={"layers/": dora_jax.Axes(1, 1)}
    )
    specs = sharding.param_specs(adapted, MESH_222)
    q = specs["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.base == P(None, "fsdp", "tensor")
    assert (q.a, q.b) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert q.magnitude == P(None, "tensor")
    o = specs["layers"]["self_attn"]["o_proj"]["kernel"]
    assert (o.a, o.b) == (P(None, "tensor", None), P(None, None, "fsdp"))
    assert o.magnitude == P(None, "fsdp")
    # Plain stacked kernels and norms: the rule names the trailing axes.
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["input_layernorm"]["scale"] == P(None, None)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_specs(method):
    cfg, params = _llama_params()
    stacked = stack_layer_params(params, cfg.num_layers)
    adapted = dora_jax.wrap(
        stacked, rank=8, method=method, targets=r"up_proj/kernel$", axes=lambda p, x: (1, 1)
    )
    node = sharding.param_specs(adapted, MESH_222)["layers"]["mlp"]["up_proj"]["kernel"]
    assert (node.shared_a, node.shared_b) == (P(), P())
    assert (node.d, node.b) == (P(None, None), P(None, "tensor"))
    if method == "dvora":
        assert node.magnitude == P(None, "tensor")


def test_specs_fit_the_mesh():
    params = {"up_proj": {"kernel": jnp.zeros((6, 8))}, "bias": jnp.zeros((3,))}
    mesh = AbstractMesh((1, 4, 2), sharding.AXES)
    specs = sharding.param_specs(params, mesh)
    # 6 is not divisible by fsdp=4: that axis is replicated rather than failing to compile.
    assert specs["up_proj"]["kernel"] == P(None, "tensor")
    rules = ((r"kernel$", P(("data", "fsdp"), "tensor")),)
    assert sharding.param_specs({"kernel": jnp.zeros((8, 8))}, mesh, rules)["kernel"] == P(
        ("data", "fsdp"), "tensor"
    )


def test_rule_naming_too_many_axes_is_a_clear_error():
    params = {"q_proj": {"kernel": jnp.zeros((4, 8))}}
    rules = ((r"q_proj", P(None, None, "fsdp", "tensor")),)
    with pytest.raises(ValueError, match="names 4 axes"):
        sharding.param_specs(dora_jax.wrap(params, rank=2), rules=rules)


def test_opt_state_is_sharded_like_its_parameter():
    _, params = _llama_params()
    adapted = dora_jax.wrap(params, rank=4, targets=r"proj/kernel$")
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES)
    sh = sharding.shardings(adapted, mesh)
    _, trainable = dora_jax.partition(adapted)
    _, trainable_sh = dora_jax.partition(sh)
    for tx, params_of_tx, sh_of_tx in [
        (optax.adamw(1e-3), trainable, trainable_sh),
        (dora_jax.only_trainable(optax.adam(1e-3)), adapted, sh),
    ]:
        state = jax.eval_shape(tx.init, params_of_tx)
        state_sh = sharding.opt_state_shardings(state, params_of_tx, sh_of_tx, mesh)
        flat = {
            jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(state_sh)[0]
        }
        mu = [s for k, s in flat.items() if "mu" in k and "q_proj" in k and k.endswith(".a")]
        assert mu and all(s.spec == P("fsdp", None) for s in mu)
        nu = [s for k, s in flat.items() if "nu" in k and "o_proj" in k and "magnitude" in k]
        assert nu and all(s.spec == P("fsdp") for s in nu)
        counts = [s for k, s in flat.items() if "count" in k]
        assert counts and all(s.spec == P() for s in counts)


def test_mesh_from_string():
    assert dict(sharding.mesh_from_string("").shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert dict(sharding.mesh_from_string("data=-1").shape)["data"] == jax.device_count()
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.mesh_from_string("data=2,fsdp=2,tensor=2")
    with pytest.raises(ValueError, match="bad mesh"):
        sharding.mesh_from_string("model=2")


def test_step_on_one_device_matches_plain_jit(reference):
    # The sharded step on one device is the plain computation: loss at step 0 equals an
    # unsharded forward of the same adapted params.
    train = train_sharded()
    cfg = LlamaConfig.tiny()
    trainer = train.Trainer(cfg, sharding.make_mesh())
    tokens = train.tokens_at(0, 8, 16, cfg.vocab_size)
    forward = jax.jit(dora_jax.apply(trainer.model.apply))
    logits = forward({"params": trainer.adapted()}, tokens)
    assert float(train.cross_entropy(logits, tokens)) == pytest.approx(reference[0][0], rel=1e-6)


# --- rules, mesh strings and quantised bases ----------------------------------------------


def test_misspelled_mesh_axis_in_a_rule_is_a_clear_error():
    params = {"q_proj": {"kernel": jnp.zeros((8, 8))}}
    rules = ((r"q_proj", P("fdsp", "tensor")), *sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"'fdsp'.*axes are \('data', 'fsdp', 'tensor'\)"):
        sharding.param_specs(dora_jax.wrap(params, rank=2), MESH_222, rules)
    # The defaults on a mesh without some of their axes still drop them (documented).
    mesh = AbstractMesh((2,), ("fsdp",))
    specs = sharding.param_specs({"q_proj": {"kernel": jnp.zeros((8, 8))}}, mesh)
    assert specs["q_proj"]["kernel"] == P("fsdp", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=two", "size of 'data' is 'two', not an integer"),
        ("fsdp=", "size of 'fsdp' is '', not an integer"),
        ("data=2;fsdp=2", "size of 'data' is '2;fsdp=2'.*separated by ','"),
        ("data=4,data=1", "axis 'data' is given twice"),
        ("model=2", "'model=2' does not name one of the axes"),
    ],
)
def test_malformed_mesh_strings_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=f"bad mesh {spec!r}: .*{message}"):
        sharding.mesh_from_string(spec)


def test_quantised_codes_and_scales_follow_their_kernel():
    _, params = _llama_params()
    adapted = dora_jax.wrap(params, rank=4, targets=r"(q_proj|down_proj)/kernel$")
    adapted = dora_jax.quantize_base(adapted, "q4_1", block=32)
    specs = sharding.param_specs(adapted, MESH_222)
    q = _node(specs, "layers_0/self_attn/q_proj/kernel").base  # kernel P(fsdp, tensor)
    assert (q.codes, q.scales, q.offsets) == (
        P("tensor", "fsdp", None), P("tensor", "fsdp"), P("tensor", "fsdp")
    )  # fmt: skip
    down = _node(specs, "layers_0/mlp/down_proj/kernel").base  # kernel P(tensor, fsdp)
    assert (down.codes, down.scales) == (P("fsdp", "tensor", None), P("fsdp", "tensor"))


def test_flattened_output_axes_shard_only_by_a_leading_prefix():
    assert sharding._flat_entry(("tensor", None)) == "tensor"
    assert sharding._flat_entry((None, "tensor")) is None  # not contiguous once flattened
    assert sharding._flat_entry(("fsdp", "tensor", None)) == ("fsdp", "tensor")
    assert sharding._flat_entry((("data", "fsdp"), None, "tensor")) == ("data", "fsdp")


def test_default_rules_on_a_mesh_of_other_axis_names_are_a_clear_error():
    # Axes named dp/mp are not the default rules' data/fsdp/tensor: every kernel would be
    # replicated over all devices without a word.
    mesh = jax.sharding.AbstractMesh((2, 4), ("dp", "mp"))
    params = {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    with pytest.raises(ValueError, match=r"\['dp', 'mp'\] are not among them.*rules="):
        dora_jax.sharding.param_specs(params, mesh)
    with pytest.raises(ValueError, match=r"also has \['dp', 'mp'\]"):
        dora_jax.sharding.batch_sharding(mesh)
    # Rules that name the mesh's axes, and meshes of the default names, work.
    rules = (("kernel$", P("dp", "mp")),)
    assert dora_jax.sharding.param_specs(params, mesh, rules=rules) == {"kernel": P("dp", "mp")}
    tensor_only = jax.sharding.AbstractMesh((4,), ("tensor",))
    assert dora_jax.sharding.batch_sharding(tensor_only).spec == P(None)
