"""merge and the exports of an adapted tree whose adapter leaves are sharded otherwise than
their base kernels (``A`` over its input axis, ``B`` replicated, the base over its output
axis, the magnitude over another mesh axis), on ``Explicit`` (``jax.make_mesh``'s default)
and ``Auto`` meshes of 8 simulated devices.

``merge`` (eager and under ``jit``) gives each kernel ``W'`` with its base's sharding, equal
to the plain-numpy formula of docs/conventions.md, and gathers no kernel-sized array onto
the devices; ``partition``/``combine``, the factored forward (``apply``, jitted under
``jax.set_mesh``), ``peft.save`` and ``to_hf`` of the merged params work on the same tree.

The device count is fixed when jax starts, so the run is one subprocess for the module.
"""

import importlib.util

import numpy as np
import pytest

from tests.helpers import ROOT, case_result, device_result

pytestmark = pytest.mark.e2e

METHODS = ("lora", "dora", "vera", "dvora")
MESHES = ("explicit", "auto")

_SCRIPT = r"""
import dataclasses, functools, importlib.util, json, re, sys, tempfile, warnings
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import dora_jax
from tests.helpers import record_case

jax.config.update("jax_default_matmul_precision", "highest")
warnings.simplefilter("ignore")
R, S = 4, 2.0  # rank, LoRA scale alpha / r
rng = np.random.default_rng(0)
W0 = {{"dense": {{"kernel": rng.normal(size=(16, 32)).astype(np.float32) / 4}},
      "stacked": {{"weight": rng.normal(size=(2, 32, 16)).astype(np.float32) / 4}}}}
AXES = {{"dense/kernel": dora_jax.Axes((), (0,)), "stacked/weight": dora_jax.Axes((0,), (2,))}}
# Leaf placements: the base over its output (and stack) axes, A over its input axis, the
# others over other mesh axes or replicated: nothing laid out like its kernel.
SPECS = {{
    "dense": dict(base=P(None, "model"), a=P("model", None), b=P(), magnitude=P("data"),
                  d=P(), vb=P("data")),
    "stacked": dict(base=P("data", "model", None), a=P(None, "model", None),
                    b=P(None, None, "data"), magnitude=P(None, "data"), d=P(None, "model"),
                    vb=P(None, "data")),
}}
SHARED = dict(shared_a=P("model", None), shared_b=P(None, "model"))
out = {{}}


case = functools.partial(record_case, out)


def host_tree(method):
    # The adapted tree on the host with non-trivial trainable leaves (numpy arrays).
    alpha = {{"alpha": R * S}} if method in ("lora", "dora") else {{}}
    ad = dora_jax.wrap(W0, rank=R, method=method, **alpha, axes=AXES,
                       targets=r"kernel|weight", key=jax.random.key(1))
    ad = jax.tree.map(np.asarray, ad)
    for name in ("dense", "stacked"):
        leaf = "kernel" if name == "dense" else "weight"
        node = ad[name][leaf]
        new = {{"b": rng.normal(size=node.b.shape).astype(np.float32) * 0.3}}
        if hasattr(node, "magnitude"):
            new["magnitude"] = node.magnitude * rng.uniform(0.5, 1.5, node.magnitude.shape)
            new["magnitude"] = new["magnitude"].astype(np.float32)
        if hasattr(node, "d"):
            new["d"] = rng.normal(size=node.d.shape).astype(np.float32)
        ad[name][leaf] = dataclasses.replace(node, **new)
    return ad


def placed(host, mesh, replicated=()):
    # The tree on the mesh as SPECS says, the fields named in `replicated` replicated.
    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    tree = {{}}
    for name, node in (("dense", host["dense"]["kernel"]), ("stacked", host["stacked"]["weight"])):
        sp = {{k: P() if k in replicated else v for k, v in SPECS[name].items()}}
        new = {{"base": put(node.base, sp["base"])}}
        if hasattr(node, "a"):
            new.update(a=put(node.a, sp["a"]), b=put(node.b, sp["b"]))
        else:
            new.update(d=put(node.d, sp["d"]), b=put(node.b, sp["vb"]))
            new.update({{k: put(getattr(node, k), v) for k, v in SHARED.items()}})
        if hasattr(node, "magnitude"):
            new["magnitude"] = put(node.magnitude, sp["magnitude"])
        tree[name] = {{"kernel" if name == "dense" else "weight": dataclasses.replace(node, **new)}}
    return tree


def reference(method, host):
    # W' by the formulas of docs/conventions.md in float64, each kernel in its own layout.
    refs = {{}}
    for name in ("dense", "stacked"):
        node = host[name]["kernel" if name == "dense" else "weight"]
        w = np.asarray(node.base, np.float64)
        wc = w[None] if name == "dense" else w.transpose(0, 2, 1)  # (layers, in, out)
        layers, n_in, n_out = wc.shape
        if method in ("lora", "dora"):
            a = np.asarray(node.a, np.float64).reshape(layers, n_in, R)
            b = np.asarray(node.b, np.float64).reshape(layers, R, n_out)
            dw = S * a @ b
        else:
            sa = np.asarray(node.shared_a, np.float64)[:n_in]
            sb = np.asarray(node.shared_b, np.float64)[:, :n_out]
            d = np.asarray(node.d, np.float64).reshape(layers, R)
            vb = np.asarray(node.b, np.float64).reshape(layers, n_out)
            dw = np.stack([(sa * d[l]) @ sb * vb[l] for l in range(layers)])
        v = wc + dw
        if method in ("dora", "dvora"):
            m = np.asarray(node.magnitude, np.float64).reshape(layers, 1, n_out)
            v = m * v / np.sqrt(np.sum(v * v, axis=1, keepdims=True))
        refs[name] = v[0] if name == "dense" else v.transpose(0, 2, 1)
    return refs


def spec_of(x):
    s = tuple(x.sharding.spec)
    return str((*s, *(None,) * (x.ndim - len(s))))


def compare(merged, refs, want_specs):
    got = {{"dense": merged["dense"]["kernel"], "stacked": merged["stacked"]["weight"]}}
    return {{
        name: {{"err": float(np.max(np.abs(np.asarray(got[name], np.float64) - refs[name]))),
                "scale": float(np.max(np.abs(refs[name]))),
                "spec": spec_of(got[name]), "want": want_specs[name]}}
        for name in got
    }}


def kernel_collectives(compiled_text):
    # Collectives whose result holds a whole dense kernel or half a stacked one (512 values;
    # the largest adapter leaf, the stacked B, holds 256).
    found = []
    for ln in compiled_text.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|"
                      r"all-reduce|reduce-scatter)\(", ln)
        if m and np.prod([int(d) for d in m.group(1).split(",") if d]) >= 512:
            found.append(ln.strip()[:200])
    return found


def model(p, x):
    return x @ p["dense"]["kernel"], jnp.einsum("bi,loi->blo", x, p["stacked"]["weight"])


for mesh_name, kind in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    for method in ("lora", "dora", "vera", "dvora"):
        host = host_tree(method)
        tree = placed(host, mesh)
        refs = reference(method, host)
        want = {{"dense": spec_of(tree["dense"]["kernel"].base),
                 "stacked": spec_of(tree["stacked"]["weight"].base)}}
        key = f"{{mesh_name}}/{{method}}"
        case(key + "/merge_eager", lambda: compare(dora_jax.merge(tree), refs, want))
        case(key + "/merge_jit", lambda: compare(jax.jit(dora_jax.merge)(tree), refs, want))

        def collectives():
            text = jax.jit(dora_jax.merge).lower(tree).compile().as_text()
            return {{"found": kernel_collectives(text)}}

        case(key + "/collectives", collectives)

        def partition_combine():
            frozen, trainable = dora_jax.partition(tree)
            back = dora_jax.combine(frozen, trainable)
            same = all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))
            merged = jax.jit(dora_jax.merge)(dora_jax.combine(frozen, trainable))
            return {{"same_leaves": same, **compare(merged, refs, want)}}

        case(key + "/partition_combine", partition_combine)

        def forward():
            # A over its input axis, the base over its output axis, B and the vectors
            # replicated (the factored forward adds (x A) B e to x W0 as they come).
            fwd_tree = placed(host, mesh, replicated=("b", "magnitude", "d", "vb"))
            x = rng.normal(size=(8, 16)).astype(np.float32)
            xs = jax.device_put(x, NamedSharding(mesh, P()))
            with jax.set_mesh(mesh):
                y1, y2 = jax.jit(dora_jax.apply(model))(fwd_tree, xs)
            x64 = x.astype(np.float64)
            want1 = x64 @ refs["dense"]
            want2 = np.einsum("bi,loi->blo", x64, refs["stacked"])
            err = max(float(np.max(np.abs(np.asarray(y1) - want1))),
                      float(np.max(np.abs(np.asarray(y2) - want2))))
            return {{"err": err, "scale": float(np.max(np.abs(want2)))}}

        case(key + "/apply", forward)

        def peft_save():
            if importlib.util.find_spec("safetensors") is None:
                return {{"missing": "safetensors"}}
            from safetensors.numpy import load_file

            name_map = lambda path, index: path.split("/")[0] + "".join(f".{{i}}" for i in index)
            with tempfile.TemporaryDirectory() as d:
                dora_jax.peft.save(d, tree, name_map=name_map)
                saved = load_file(d + "/adapter_model.safetensors")
            errs = []
            for name, leaf in (("dense", "kernel"), ("stacked", "weight")):
                node = host[name][leaf]
                for l in range(1 if name == "dense" else 2):
                    pick = (lambda v: v) if name == "dense" else (lambda v, l=l: v[l])
                    key_ = f"base_model.model.{{name}}" + ("" if name == "dense" else f".{{l}}")
                    if method in ("lora", "dora"):
                        want = {{".lora_A.weight": pick(node.a).T,
                                 ".lora_B.weight": pick(node.b).T}}
                    else:
                        want = {{".vera_lambda_d": pick(node.d), ".vera_lambda_b": pick(node.b)}}
                    if method in ("dora", "dvora"):
                        want[".lora_magnitude_vector"] = pick(node.magnitude)
                    for suffix, value in want.items():
                        errs.append(float(np.max(np.abs(saved[key_ + suffix] - value))))
            if method in ("vera", "dvora"):
                node = host["dense"]["kernel"]
                errs.append(float(np.max(np.abs(saved["base_model.vera_A"] - node.shared_a.T))))
                errs.append(float(np.max(np.abs(saved["base_model.vera_B"] - node.shared_b.T))))
            return {{"err": max(errs), "count": len(errs)}}

        case(key + "/peft_save", peft_save)

    def to_hf():
        # A one-layer Llama, q_proj split over its outputs and o_proj over its inputs, their
        # A factors and magnitudes split otherwise; its merged params written by to_hf.
        if importlib.util.find_spec("safetensors") is None:
            return {{"missing": "safetensors"}}
        from safetensors.numpy import load_file
        from dora_jax.models.llama import LlamaConfig, to_hf

        cfg = LlamaConfig.tiny(num_layers=1)
        shapes = {{"mlp": {{"down_proj": (128, 64), "gate_proj": (64, 128), "up_proj": (64, 128)}},
                   "self_attn": {{"k_proj": (64, 32), "o_proj": (64, 64), "q_proj": (64, 64),
                                  "v_proj": (64, 32)}}}}
        layer = {{part: {{name: {{"kernel": rng.normal(size=shape).astype(np.float32) / 8}}
                          for name, shape in kernels.items()}}
                  for part, kernels in shapes.items()}}
        ones = {{"scale": np.ones(64, np.float32)}}
        layer.update(input_layernorm=ones, post_attention_layernorm=ones)
        params = {{"embed_tokens": {{"embedding": rng.normal(size=(256, 64)).astype(np.float32)}},
                   "layers_0": layer, "norm": ones}}
        ad = dora_jax.wrap(params, rank=R, alpha=R * S, targets=r"(q_proj|o_proj)/kernel$",
                           key=jax.random.key(2))
        ad = jax.tree.map(np.asarray, ad)
        attn = ad["layers_0"]["self_attn"]
        layout = {{"q_proj": (P(None, "model"), P("model", None), P("data")),
                   "o_proj": (P("model", None), P(None, "data"), P("model"))}}
        for proj in layout:
            node = attn[proj]["kernel"]
            attn[proj]["kernel"] = dataclasses.replace(
                node, b=rng.normal(size=node.b.shape).astype(np.float32) * 0.3,
                magnitude=(node.magnitude * 1.25).astype(np.float32))
        host = ad  # the numpy leaves

        def put_all(x):
            return jax.device_put(x, NamedSharding(mesh, P()))

        tree = jax.tree.map(put_all, ad)
        for proj, (base, a, m) in layout.items():
            node = tree["layers_0"]["self_attn"][proj]["kernel"]
            tree["layers_0"]["self_attn"][proj]["kernel"] = dataclasses.replace(
                node, base=jax.device_put(node.base, NamedSharding(mesh, base)),
                a=jax.device_put(node.a, NamedSharding(mesh, a)),
                magnitude=jax.device_put(node.magnitude, NamedSharding(mesh, m)))
        merged = dora_jax.merge(tree)
        with tempfile.TemporaryDirectory() as d:
            to_hf(d, cfg, merged)
            saved = load_file(d + "/model.safetensors")
        errs = {{}}
        for proj in layout:
            node = host["layers_0"]["self_attn"][proj]["kernel"]
            v = np.asarray(node.base, np.float64) + S * np.asarray(node.a, np.float64) @ node.b
            w = node.magnitude * v / np.sqrt(np.sum(v * v, axis=0))
            got = saved[f"model.layers.0.self_attn.{{proj}}.weight"]
            errs[proj] = float(np.max(np.abs(got - w.T)))
        return {{"err": max(errs.values()), "scale": 1.0}}

    if mesh_name == "explicit":  # to_hf reads the merged kernels whatever their mesh
        case(f"{{mesh_name}}/dora/to_hf", to_hf)

print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    return device_result(_SCRIPT.format(root=str(ROOT)), 8, timeout=600)


def _assert_merged(got: dict, name: str) -> None:
    for kernel, run in got.items():
        if not isinstance(run, dict):
            continue
        # On an Auto mesh the sharding is XLA's choice (eager: each op's own).
        if name.startswith("explicit/"):
            assert run["spec"] == run["want"], f"{name} {kernel}: sharded {run['spec']}"
        assert run["err"] <= 2e-5 * max(1.0, run["scale"]), f"{name} {kernel}: {run}"


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_of_a_tree_sharded_otherwise_than_its_kernels(result, mesh, method):
    for how in ("merge_eager", "merge_jit"):
        name = f"{mesh}/{method}/{how}"
        _assert_merged(case_result(result, name), name)


@pytest.mark.parametrize("method", METHODS)
def test_merge_on_an_explicit_mesh_moves_no_kernel_between_devices(result, method):
    found = case_result(result, f"explicit/{method}/collectives")["found"]
    assert not found, "kernel-sized collectives:\n" + "\n".join(found)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_partition_and_combine_keep_the_placed_leaves(result, mesh, method):
    name = f"{mesh}/{method}/partition_combine"
    got = case_result(result, name)
    assert got.pop("same_leaves"), name
    _assert_merged(got, name)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_factored_forward_on_the_mesh(result, mesh, method):
    got = case_result(result, f"{mesh}/{method}/apply")
    assert got["err"] <= 1e-4 * max(1.0, got["scale"]), got


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_peft_save_writes_the_placed_leaves(result, mesh, method):
    got = case_result(result, f"{mesh}/{method}/peft_save")
    if "missing" in got:
        pytest.skip(f"needs {got['missing']}")
    assert got["count"] > 0 and got["err"] == 0.0, got


def test_to_hf_writes_the_merged_kernels(result):
    if importlib.util.find_spec("safetensors") is None:
        pytest.skip("needs safetensors")
    got = case_result(result, "explicit/dora/to_hf")
    assert got["err"] <= 2e-5, got
    assert np.isfinite(got["err"])
